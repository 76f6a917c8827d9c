"""The bench's results as a table for people and as a PNG plot (matplotlib, Agg)."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'s' * (n != 1)}"


def model_line(result: dict[str, Any]) -> str:
    model, device = result["model"], result["device"]
    millions = model["parameters"] / 1e6
    size = f"{model['layers']} layers, {model['embedding']} wide, {millions:.1f}M parameters"
    load = device["load_average"]
    threads = _count(device["torch_threads"], "thread")
    return (
        f"model    {model['path']} ({size}; {model['chosen']})\n"
        f"device   {device['type']} {device['dtype']} on {device.get('gpu') or device['cpu']}, "
        f"{device['cores']} cores, torch {device['torch']} with {threads}; "
        f"load average {load['start']} at start, {load['end']} at end"
    )


def _settings_line(result: dict[str, Any]) -> str:
    s = result["settings"]
    sampling = s["sampling"]
    how = "greedy"
    if not sampling["greedy"]:
        how = f"sampling t={sampling['temperature']:g} top-k {sampling['top_k']}"
        how += f" top-p {sampling['top_p']:g}"
    return (
        f"method   {s['turns']} messages per user, every reply {s['new_tokens']} new tokens in "
        f"both paths (EOS masked); {how}, repetition penalty {sampling['repetition_penalty']:g}; "
        f"prompt budget {s['prompt_budget']} tokens; batches of up to {s['max_batch_size']}, "
        f"{s['batch_wait_ms']:g} ms wait; KV cache {s['kv_cache_mb']} MB"
    )


def _latency(run: dict[str, Any]) -> str:
    return f"{run['latency_p50_s']:>7.3f} /{run['latency_p95_s']:>6.3f}"


def _users_table(rows: list[dict[str, Any]]) -> list[str]:
    lines = [
        f"{'':>5}  {'generated tokens/s':^28}  {'reply latency p50 / p95, s':^31}  {'ours':^21}",
        f"{'users':>5}  {'baseline':>9} {'ours':>9} {'ratio':>8}  {'baseline':>15} {'ours':>15}  "
        f"{'mean batch':>10} {'KV reused':>10}",
    ]
    for row in rows:
        b, o = row["baseline"], row["ours"]
        reused = o.get("prefix_reused_tokens", 0) / max(1, o["replies"])
        lines.append(
            f"{row['users']:>5}  {b['tokens_per_s']:>9.1f} {o['tokens_per_s']:>9.1f} "
            f"{row['speedup']:>7.2f}x  {_latency(b)} {_latency(o)}  "
            f"{o['mean_batch_size']:>10.1f} {reused:>6.0f}/msg"
        )
        for side in ("baseline", "ours"):
            if row[side]["errors"]:
                lines.append(
                    f"{'':>5}  {side}: {row[side]['errors']} messages failed, first: "
                    f"{row[side]['first_error']}"
                )
    return lines


def _overhead_line(overhead: dict[str, Any]) -> str:
    seq, conc = overhead["sequential"], overhead["concurrent"]
    line = (
        f"manager + storage (instant engine, SQLite): {seq['p50_ms']:.2f} ms p50, "
        f"{seq['p95_ms']:.2f} ms p95 per message one at a time; "
        f"{conc['messages_per_s']:,.0f} messages/s with {conc['users']} users at once "
        f"(p50 {conc['p50_ms']:.1f} ms, p95 {conc['p95_ms']:.1f} ms)"
    )
    if conc["errors"]:
        line += f"; {conc['errors']} failed, first: {conc['first_error']}"
    return line


def _int8_line(int8: dict[str, Any]) -> str:
    if "skipped" in int8:
        return f"int8: skipped ({int8['skipped']})"
    fp32, q = int8["fp32"], int8["int8"]
    line = (
        f"int8 on the CPU ({int8['users']} users, {int8['turns']} messages each): "
        f"{fp32['tokens_per_s']:.1f} -> {q['tokens_per_s']:.1f} tokens/s ({int8['speedup']:.2f}x)"
    )
    if "bf16" in int8:
        line += f"; bf16 linears {int8['bf16']['tokens_per_s']:.1f} ({int8['bf16_speedup']:.2f}x)"
    held = int8["heldout"]
    if "perplexity" not in fp32:
        return line + f"; perplexity not measured: {held['source']}"
    bf16 = f", bf16 {int8['bf16']['perplexity']:.2f}" if "bf16" in int8 else ""
    return line + (
        f"; held-out perplexity {fp32['perplexity']:.2f} -> {q['perplexity']:.2f}{bf16} "
        f"({int8['perplexity_change_pct']:+.1f}% int8; {held['dialogues']} dialogues, "
        f"{held['tokens']:,} tokens, {held['source']})"
    )


def _knowledge_line(knowledge: dict[str, Any]) -> str:
    return (
        f"knowledge base ({knowledge['entries']:.0f} FAQ entries): decide adds "
        f"{knowledge['alone_p50_ms']:.1f} ms p50 / {knowledge['alone_p95_ms']:.1f} ms p95 to a "
        f"message alone, {knowledge['batched_p50_ms']:.1f} / {knowledge['batched_p95_ms']:.1f} ms "
        f"with {knowledge['users']:.0f} users at once (mean embedding batch "
        f"{knowledge['mean_batch']:.1f})"
    )


def format_report(result: dict[str, Any]) -> str:
    turn = result["turn_latency"]
    who = f"1 user alone, median of {_count(turn['repeats'], 'conversation')}"
    lines = [model_line(result), _settings_line(result), "", *_users_table(result["users"]), ""]
    lines.append(
        f"turn {turn['turns']} / turn 1 latency ({who}): "
        f"ours {turn['ours']:.2f}, baseline {turn['baseline']:.2f}"
    )
    lines += [_overhead_line(result["overhead"]), _int8_line(result["int8"])]
    if "knowledge" in result:
        lines.append(_knowledge_line(result["knowledge"]))
    return "\n".join([*lines, *closing_lines(result)])


def closing_lines(result: dict[str, Any]) -> list[str]:
    """The end of both reports: one "[met] name: value (target ...)" line per
    target, then the run's duration."""
    lines = ["", "targets"]
    for target in result["targets"]:
        value = target["value"]
        if isinstance(value, float):
            shown = f"{value:,.2f}"
        elif isinstance(value, int):
            shown = f"{value:,}"
        else:
            shown = str(value)
        verdict = "met" if target["met"] else "MISSED"
        lines.append(f"  [{verdict:>6}] {target['name']}: {shown} (target {target['target']})")
    lines.append(f"\n{result['seconds']:.0f} s in all")
    return lines


def write_plot(result: dict[str, Any], path: str | Path) -> Path:
    """Tokens/s against simulated users for the baseline and ours, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt
    from matplotlib.ticker import ScalarFormatter

    rows = result["users"]
    users = [row["users"] for row in rows]
    figure, axes = plt.subplots(figsize=(7, 4.5), dpi=120)
    axes.plot(
        users,
        [r["baseline"]["tokens_per_s"] for r in rows],
        "o--",
        color="#888888",
        label="baseline: one generate per message",
    )
    axes.plot(
        users,
        [r["ours"]["tokens_per_s"] for r in rows],
        "o-",
        color="#1f6feb",
        label="ours: manager + storage + batched engine",
    )
    for row in rows:
        axes.annotate(
            f"{row['speedup']:.1f}x",
            (row["users"], row["ours"]["tokens_per_s"]),
            textcoords="offset points",
            xytext=(0, 7),
            ha="center",
            fontsize=9,
        )
    if len(users) > 1 and users[-1] / users[0] >= 8:
        axes.set_xscale("log", base=2)
        axes.xaxis.set_major_formatter(ScalarFormatter())
    axes.set_xticks(users)
    axes.set_xlabel("simulated users chatting at once")
    axes.set_ylabel("generated tokens/s")
    device, model = result["device"], result["model"]
    axes.set_title(
        f"{Path(model['path']).name}, {device['type']} {device['dtype']}, "
        f"{result['settings']['new_tokens']} tokens per reply",
        fontsize=10,
    )
    highest = max(max(r["ours"]["tokens_per_s"], r["baseline"]["tokens_per_s"]) for r in rows)
    axes.set_ylim(0, highest * 1.15 or 1)
    axes.grid(True, alpha=0.3)
    axes.legend(loc="upper left", fontsize=9)
    figure.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, format="png")
    plt.close(figure)
    return path
