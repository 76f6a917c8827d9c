"""The two arrival patterns of `aigc-bot bench --peers`, and one run of each
engine in them.

* lockstep: every user's next message arrives together, once every reply of
  the round is in (the static-batch peers' best case);
* closed loop: each user sends its next message as soon as its reply has
  arrived; the users' first messages are spread over `ramp_s` seconds, as
  people do not all press enter in the same millisecond.

Every engine sees the same users with the same messages: a user's history is
its messages and the replies this engine gave, fitted to the same prompt
budget by the same `encode_dialogue`. Every reply is exactly N tokens.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from bot.bench.peers import PeerServer
from bot.bench.workloads import percentile
from bot.engines import clean_reply
from bot.engines.prompt import encode_dialogue

#: (user, turns so far ending with the new message) -> (reply, tokens, prompt tokens)
Ask = Callable[[int, list[str]], Awaitable[tuple[str, int, int]]]
LOCKSTEP, CLOSED_LOOP = "lockstep", "closed-loop"
#: the bot path with `text.engine = "ctranslate2"` (run when CTranslate2 is installed)
OURS_CT2 = "ours (bot, ctranslate2)"
#: the bot path with both engines, where "auto" picks them (a CPU with AMX or without VNNI)
OURS_HYBRID = "ours (bot, local + ctranslate2)"
#: our rows, all the others are peers
OURS = ("ours (bot)", "ours (engine)", OURS_CT2, OURS_HYBRID)


@dataclass(slots=True)
class PatternRun:
    """One engine in one pattern: what every user sent, what came back, how fast."""

    engine: str
    pattern: str
    messages: list[list[str]]
    reply_tokens: list[list[int]]
    latencies: list[list[float]]
    prompt_tokens: int = 0
    seconds: float = 0.0
    errors: list[str] = field(default_factory=list)

    @property
    def tokens(self) -> int:
        return sum(sum(turns) for turns in self.reply_tokens)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0

    def turn_ratio(self) -> float:
        first = [turns[0] for turns in self.latencies if turns]
        last = [turns[-1] for turns in self.latencies if turns]
        if not first or not last:
            return float("nan")
        return (sum(last) / len(last)) / (sum(first) / len(first))

    def summary(self) -> dict[str, Any]:
        latencies = [value for turns in self.latencies for value in turns]
        summary: dict[str, Any] = {
            "engine": self.engine,
            "pattern": self.pattern,
            "users": len(self.messages),
            "replies": sum(len(turns) for turns in self.reply_tokens),
            "tokens": self.tokens,
            "prompt_tokens": self.prompt_tokens,
            "seconds": round(self.seconds, 3),
            "tokens_per_s": round(self.tokens_per_s, 1),
            "latency_p50_s": round(percentile(latencies, 50), 4),
            "latency_p95_s": round(percentile(latencies, 95), 4),
            "turn_ratio": round(self.turn_ratio(), 3),
            "errors": len(self.errors),
        }
        if self.errors:
            summary["first_error"] = self.errors[0]
        return summary


async def run_pattern(
    engine: str,
    pattern: str,
    ask: Ask,
    scripts: Sequence[Sequence[str]],
    *,
    ramp_s: float = 0.0,
    tick: Callable[[], None] = lambda: None,
) -> PatternRun:
    users = len(scripts)
    run = PatternRun(
        engine,
        pattern,
        [[] for _ in scripts],
        [[] for _ in scripts],
        [[] for _ in scripts],
    )
    histories: list[list[str]] = [[] for _ in scripts]

    async def one(user: int, text: str) -> None:
        history = histories[user]
        history.append(text)
        run.messages[user].append(text)
        started = time.perf_counter()
        try:
            reply, tokens, prompt = await ask(user, list(history))
        except Exception as exc:
            run.errors.append(f"user {user}: {type(exc).__name__}: {exc}")
            reply, tokens, prompt = "", 0, 0
        run.latencies[user].append(time.perf_counter() - started)
        run.reply_tokens[user].append(tokens)
        run.prompt_tokens += prompt
        history.append(reply or "ok")
        tick()

    started = time.perf_counter()
    if pattern == LOCKSTEP:
        for turn in range(max(len(script) for script in scripts)):
            await asyncio.gather(
                *(
                    one(user, script[turn])
                    for user, script in enumerate(scripts)
                    if turn < len(script)
                )
            )
    else:

        async def user_loop(user: int, script: Sequence[str]) -> None:
            if ramp_s and users > 1:
                await asyncio.sleep(ramp_s * user / users)
            for text in script:
                await one(user, text)

        await asyncio.gather(*(user_loop(user, script) for user, script in enumerate(scripts)))
    run.seconds = time.perf_counter() - started
    return run


# -- how each engine answers ----------------------------------------------------------


def peer_ask(server: PeerServer, tokenizer: Any, budget: int) -> Ask:
    async def ask(user: int, turns: list[str]) -> tuple[str, int, int]:
        prompt = encode_dialogue(tokenizer, turns, budget)
        ids = await server.reply(prompt)
        text = clean_reply(tokenizer.decode(ids, skip_special_tokens=True))
        return text, len(ids), len(prompt)

    return ask


def engine_ask(engine: Any, tag: str) -> Ask:
    """Our engine alone (no manager, no database), on the peers' harness. The
    prompt's length is the engine's own count: encoding the prompt here too, on
    the event loop, only to report it held the GIL against the engine's thread."""

    async def ask(user: int, turns: list[str]) -> tuple[str, int, int]:
        async for chunk in engine.stream(turns, conversation=f"{tag}-{user}"):
            if chunk.final:
                return chunk.text, chunk.tokens, chunk.prompt_tokens
        raise RuntimeError("the engine ended without a reply")

    return ask


def bot_ask(manager: Any, tag: str) -> Ask:
    """The real path: `manager.handle` with the SQLite store. The history is the
    database's; tokens are counted by the engine (see `run_bot`)."""
    from bot.messages import Incoming, Notice, Text

    async def ask(user: int, turns: list[str]) -> tuple[str, int, int]:
        name = f"{tag}-{user}"
        final, notice = None, None
        async for reply in manager.handle(Incoming("bench", name, name, f"user {user}", turns[-1])):
            if isinstance(reply, Notice):
                notice = reply.text
            elif isinstance(reply, Text) and reply.final:
                final = reply.text
        if final is None:
            raise RuntimeError(notice or "no reply")
        return final, 0, 0

    return ask


async def run_bot(
    manager: Any,
    engine: Any,
    pattern: str,
    scripts: Sequence[Sequence[str]],
    tag: str,
    *,
    ramp_s: float,
    tick: Callable[[], None],
    name: str = "ours (bot)",
) -> PatternRun:
    """`bot_ask` in a pattern, with each reply's tokens taken from the engine's
    counter (rows of one reply are the only ones that grow it per reply)."""
    before = engine.generated_tokens
    run = await run_pattern(name, pattern, bot_ask(manager, tag), scripts, ramp_s=ramp_s, tick=tick)
    total = engine.generated_tokens - before
    replies = sum(len(turns) for turns in run.reply_tokens) - len(run.errors)
    each = total // replies if replies else 0
    run.reply_tokens = [[each] * len(turns) for turns in run.reply_tokens]
    if replies and each * replies != total:
        run.errors.append(f"replies had unequal lengths: {total} tokens in {replies} replies")
    return run
