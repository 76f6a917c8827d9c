"""`aigc-bot bench --peers` as a table for people and as a PNG plot."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bot.bench.peer_run import OURS
from bot.bench.report import closing_lines, model_line

MB = 2**20


def _runs_table(runs: list[dict[str, Any]]) -> list[str]:
    wide = max([23, *(len(run["engine"]) for run in runs)])
    lines = [
        f"{'users':>5}  {'pattern':<11}  {'engine':<{wide}} {'tokens/s':>9}  "
        f"{'latency p50 / p95, s':>20}  {'turn N/1':>8}  {'prompt tok/reply':>16}",
    ]
    for run in runs:
        prompt = run["prompt_tokens"] / run["replies"] if run["replies"] else 0
        shown = f"{prompt:>16.0f}" if run["prompt_tokens"] else f"{'(database)':>16}"
        lines.append(
            f"{run['users']:>5}  {run['pattern']:<11}  {run['engine']:<{wide}} "
            f"{run['tokens_per_s']:>9.1f}  "
            f"{run['latency_p50_s']:>9.3f} / {run['latency_p95_s']:>6.3f}"
            f"  {run['turn_ratio']:>8.2f}  {shown}"
        )
        if run["errors"]:
            lines.append(f"{'':>7}{run['errors']} failed, first: {run['first_error']}")
    return lines


def _memory_line(memory: dict[str, Any]) -> str:
    if "error" in memory:
        return f"memory: not measured ({memory['error']})"
    budget = memory["kv_budget_bytes"]
    within = "within" if not budget or memory["kv_bytes"] <= budget else "OVER"
    engine = memory.get("engine", "local")
    return (
        f"memory ({engine} engine, {memory['users']} users, {memory['turns']} messages each, "
        f"fresh process): peak RSS {memory['peak_rss_bytes'] / MB:,.0f} MB; KV cache "
        f"{memory['kv_bytes'] / MB:,.1f} MB ({memory['kv_batch_bytes'] / MB:,.1f} MB batch, "
        f"{memory['batch_rows']} rows; {memory['kv_prefix_bytes'] / MB:,.1f} MB prefix cache, "
        f"{memory['kv_prefix_entries']} conversations) = "
        f"{100 * memory['kv_share_of_peak_rss']:.0f}% of the peak, {within} "
        f"text.kv_cache_mb = {budget // MB}{' (no limit)' if not budget else ''}"
    )


def format_peers(result: dict[str, Any]) -> str:
    work = result["workload"]
    sampling = work["sampling"]
    how = (
        "greedy"
        if sampling["greedy"]
        else (
            f"t={sampling['temperature']:g} top-k {sampling['top_k']} top-p {sampling['top_p']:g}"
        )
    )
    lines = [
        model_line(result),
        f"workload {work['turns']} messages per user, every reply {work['new_tokens']} tokens "
        f"({how}, repetition penalty {sampling['repetition_penalty']:g}); prompt budget "
        f"{result['prompt_budget']} tokens; batches of up to {work['max_batch_size']} after "
        f"{work['batch_wait_ms']:g} ms; closed-loop users start over "
        f"{work['closed_loop_ramp_s']:g} s",
    ]
    for skipped in result["skipped"]:
        lines.append(f"skipped  {skipped['engine']}: {skipped['note']}")
    lines += ["", *_runs_table(result["runs"]), ""]
    for entry in result["ratios"]:
        ours = ", ".join(f"{name} {entry[name]:.2f}x" for name in OURS if name in entry)
        lines.append(
            f"{entry['users']:>3} users, {entry['pattern']:<11}: best peer {entry['best_peer']} "
            f"{entry['best_peer_tokens_per_s']:.0f} tokens/s; {ours}"
        )
    for run in result["runs"]:
        if "engine_batches" in run:
            routed = ", ".join(f"{key} {count}" for key, count in run["engine_batches"].items())
            lines.append(
                f"{run['users']:>3} users, {run['pattern']:<11}: {run['engine']} answered "
                f"batches with {routed}"
            )
    turn = result["turn_latency"]
    lines.append(
        f"turn {turn['turns']} / turn 1 latency ({result.get('default_engine', 'ours (bot)')}, "
        f"1 user alone, median of {turn['repeats']}): {turn['ours']:.2f}"
    )
    lines.append(
        f"the targets are read on {result.get('default_engine', 'ours (bot)')}: the bot with "
        "the engine text.engine gives this machine"
    )
    if "memory" in result:
        lines.append(_memory_line(result["memory"]))
    return "\n".join([*lines, *closing_lines(result)])


def write_peers_plot(result: dict[str, Any], path: str | Path) -> Path:
    """Tokens/s of every engine against users, one panel per arrival pattern."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    runs = result["runs"]
    patterns = list(dict.fromkeys(run["pattern"] for run in runs))
    engines = list(dict.fromkeys(run["engine"] for run in runs))
    users = sorted({run["users"] for run in runs})
    figure, axes = plt.subplots(1, len(patterns), figsize=(6 * len(patterns), 4.5), dpi=110)
    axes_list = list(axes) if len(patterns) > 1 else [axes]
    width = 0.8 / max(1, len(engines))
    for panel, pattern in zip(axes_list, patterns, strict=True):
        for index, engine in enumerate(engines):
            values = []
            for count in users:
                match = [
                    r
                    for r in runs
                    if r["pattern"] == pattern and r["engine"] == engine and r["users"] == count
                ]
                values.append(match[0]["tokens_per_s"] if match else 0.0)
            positions = [i + (index - (len(engines) - 1) / 2) * width for i in range(len(users))]
            bold = engine.startswith("ours")
            panel.bar(positions, values, width, label=engine, alpha=1.0 if bold else 0.6)
        panel.set_xticks(range(len(users)), [str(u) for u in users])
        panel.set_xlabel("users chatting at once")
        panel.set_ylabel("generated tokens/s")
        panel.set_title(pattern, fontsize=10)
        panel.grid(True, axis="y", alpha=0.3)
    axes_list[0].legend(fontsize=8, loc="upper left")
    device, model = result["device"], result["model"]
    figure.suptitle(
        f"{Path(model['path']).name}, {device['type']} {device['dtype']} "
        f"(our linear layers: {device.get('linears', 'none')}), {device['torch_threads']} "
        f"thread(s) per engine, load average {device['load_average']['start']}-"
        f"{device['load_average']['end']}, "
        f"{result['workload']['new_tokens']} tokens per reply",
        fontsize=10,
    )
    figure.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, format="png")
    plt.close(figure)
    return path
