"""The workloads `aigc-bot bench` times: simulated users, the plain-`generate` baseline,
the instant engine for manager + storage overhead, and held-out perplexity.

Users are closed loops: each sends its next message once the previous reply
has arrived, all of them at once. Every latency is wall time from sending a
message to its final reply.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from bot.config import TextSection
from bot.engines import TextChunk
from bot.engines.prompt import encode_dialogue
from bot.messages import Incoming, Notice, Text

Tick = Callable[[], None]


def percentile(values: Sequence[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default)."""
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    rank = (len(ordered) - 1) * q / 100
    low = int(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


@dataclass(slots=True)
class Run:
    """One workload: `latencies[user][turn]` in seconds (None where the bot answered
    with a notice instead of a reply), tokens generated, wall time, and the notices."""

    latencies: list[list[float | None]]
    tokens: int
    seconds: float
    errors: list[str] = field(default_factory=list)

    def answered(self) -> list[float]:
        return [value for turns in self.latencies for value in turns if value is not None]

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0

    def turn_ratio(self) -> float:
        """Mean latency of the last turn over the mean latency of the first."""
        first = [turns[0] for turns in self.latencies if turns and turns[0] is not None]
        last = [turns[-1] for turns in self.latencies if turns and turns[-1] is not None]
        if not first or not last:
            return float("nan")
        return (sum(last) / len(last)) / (sum(first) / len(first))

    def summary(self) -> dict[str, Any]:
        answered = self.answered()
        summary: dict[str, Any] = {
            "tokens_per_s": round(self.tokens_per_s, 2),
            "latency_p50_s": round(percentile(answered, 50), 4),
            "latency_p95_s": round(percentile(answered, 95), 4),
            "turn_ratio": round(self.turn_ratio(), 3),
            "replies": len(answered),
            "tokens": self.tokens,
            "seconds": round(self.seconds, 3),
            "errors": len(self.errors),
        }
        if self.errors:
            summary["first_error"] = self.errors[0]
        return summary


# -- ours: the real path -----------------------------------------------------------


async def converse(manager: Any, scripts: Sequence[Sequence[str]], tag: str, tick: Tick) -> Run:
    """Every user of `scripts` chats through `manager.handle` at once. A message
    answered with a notice (storage down, say) counts as an error, and the user
    goes on with the next. `tokens` is left at 0 for the caller to fill."""
    latencies: list[list[float | None]] = [[None] * len(script) for script in scripts]
    errors: list[str] = []

    async def user(index: int, script: Sequence[str]) -> None:
        name = f"{tag}-{index}"
        for turn, text in enumerate(script):
            incoming = Incoming("bench", name, name, f"user {index}", text)
            started = time.perf_counter()
            final = notice = None
            async for reply in manager.handle(incoming):
                if isinstance(reply, Notice):
                    notice = f"{reply.kind}: {reply.text}"
                elif isinstance(reply, Text) and reply.final:
                    final = reply.text
            tick()
            if final is None:
                errors.append(f"{name}, message {turn + 1}: {notice or 'no reply'}")
                continue
            latencies[index][turn] = time.perf_counter() - started

    started = time.perf_counter()
    await asyncio.gather(*(user(index, script) for index, script in enumerate(scripts)))
    return Run(latencies, 0, time.perf_counter() - started, errors)


def mask_eos(model: Any, eos_id: int) -> Any:
    """Make EOS impossible (logit -inf), so every reply runs to max_new_tokens and
    both paths generate the same number of tokens. Returns the hook's handle."""

    def hook(_module: Any, _args: Any, output: Any) -> Any:
        output.logits[..., eos_id] = float("-inf")
        return output

    return model.register_forward_hook(hook)


# -- the baseline: one generate per message ------------------------------------------


class GenerateBot:
    """What most GPT-2 bots do: history kept as text, and for every message one
    `model.generate` over the whole (budget-trimmed) history, one at a time."""

    def __init__(
        self, model: Any, tokenizer: Any, device: Any, text: TextSection, budget: int
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.device = device
        self.text = text
        self.budget = budget
        self.eos_id = tokenizer.eos_token_id
        sampling: dict[str, Any] = {
            "do_sample": not text.greedy,
            "repetition_penalty": text.repetition_penalty,
        }
        if not text.greedy:
            sampling.update(temperature=text.temperature, top_k=text.top_k, top_p=text.top_p)
        self.sampling = sampling

    def reply(self, turns: Sequence[str], max_new_tokens: int | None = None) -> tuple[str, int]:
        """(cleaned reply, tokens generated); runs on a worker thread."""
        import torch

        # as our engine's thread does (denormals take a slow path on x86); the
        # setting is this thread's own
        torch.set_flush_denormal(True)

        ids = encode_dialogue(self.tokenizer, turns, self.budget)
        input_ids = torch.tensor([ids], dtype=torch.long, device=self.device)
        with torch.inference_mode():
            output = self.model.generate(
                input_ids,
                attention_mask=torch.ones_like(input_ids),
                max_new_tokens=max_new_tokens or self.text.max_new_tokens,
                pad_token_id=self.eos_id,
                eos_token_id=self.eos_id,
                **self.sampling,
            )
        new = output[0, len(ids) :].tolist()
        text = " ".join(
            self.tokenizer.decode(new, skip_special_tokens=True).replace("\ufffd", "").split()
        )
        return text or self.text.fallback_reply, len(new)


async def baseline_converse(bot: GenerateBot, scripts: Sequence[Sequence[str]], tick: Tick) -> Run:
    """The same users against the baseline: their messages queue (FIFO) for one
    `generate` at a time, as in a bot that calls the model under a lock."""
    latencies: list[list[float | None]] = [[None] * len(script) for script in scripts]
    lock = asyncio.Lock()
    tokens = 0

    async def user(index: int, script: Sequence[str]) -> None:
        nonlocal tokens
        history: list[str] = []
        for turn, text in enumerate(script):
            started = time.perf_counter()
            history.append(text)
            async with lock:
                reply, count = await asyncio.to_thread(bot.reply, list(history))
            history.append(reply)
            tokens += count
            latencies[index][turn] = time.perf_counter() - started
            tick()

    started = time.perf_counter()
    await asyncio.gather(*(user(index, script) for index, script in enumerate(scripts)))
    return Run(latencies, tokens, time.perf_counter() - started)


# -- manager + storage overhead ---------------------------------------------------------


class InstantEngine:
    """A `TextEngine` that answers at once: what is left to time is the manager and the store."""

    ready = True
    queue_depth = 0

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        return None

    async def stream(
        self, turns: Sequence[str], *, conversation: str = ""
    ) -> AsyncIterator[TextChunk]:
        yield TextChunk("ok", final=True, tokens=1)

    async def generate(self, turns: Sequence[str], *, conversation: str = "") -> str:
        return "ok"


# -- held-out perplexity ---------------------------------------------------------------


def heldout_dialogues(model_dir: str, count: int) -> tuple[list[list[str]], str]:
    """Dialogues the model did not train on, and where they come from.

    The chitchat split `aigc-bot train` held out (its val_fraction and seed,
    read from the model's training.json when there is one); an empty list when
    the training package is not installed.
    """
    import json
    from pathlib import Path

    try:
        from bot.training import data
        from bot.training.trainer import TrainOptions
    except ImportError:
        return [], "no held-out data (bot.training is not installed)"
    options: dict[str, Any] = {}
    record = Path(model_dir) / "training.json"
    if record.is_file():
        options = json.loads(record.read_text(encoding="utf-8")).get("options", {})
    defaults = TrainOptions()
    fraction = float(options.get("val_fraction", defaults.val_fraction))
    seed = int(options.get("seed", defaults.seed))
    dialogues = data.load_chitchat()
    if options.get("data", data.CHITCHAT) == data.CHITCHAT:
        _, dialogues = data.split(dialogues, fraction, seed)
        where = f"chitchat held-out split (val_fraction {fraction:g}, seed {seed})"
    else:
        where = "chitchat (the model was trained on other data)"
    return dialogues[:count], where


def perplexity_of(
    model: Any, tokenizer: Any, device: Any, dialogues: Sequence[Sequence[str]]
) -> tuple[float, int]:
    """(perplexity, scored tokens) of `model` on `dialogues` in the engine's turn format."""
    from bot.engines.loading import model_positions
    from bot.training.data import encode_dialogues
    from bot.training.evaluate import dialogue_nll, perplexity

    block = model_positions(model)
    examples = encode_dialogues(tokenizer, dialogues, block)
    nll, count = dialogue_nll(model, examples, device)
    return perplexity(nll, count), count
