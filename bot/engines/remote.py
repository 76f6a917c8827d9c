"""Text from an OpenAI-compatible completions server (vLLM, llama.cpp server, TGI).

This is the scale-out path for inference: several bot processes share one GPU
server. The dialogue format is the same as the local engine's: turns joined by
the model's EOS text (fitted to the budget by the same `fit_dialogue`), and
generation stops at the next EOS.

A server that cannot be reached, times out or answers 429/5xx before sending
anything is retried `retries` times with doubling backoff, then the request
fails with `EngineUnavailable`. Once text has streamed, a failure is not
retried (what the user saw cannot be taken back).
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Sequence
from typing import Any

import aiohttp

from bot.engines import EngineObserver, EngineUnavailable, TextChunk, clean_reply
from bot.engines.prompt import encode_dialogue, fit_dialogue
from bot.engines.settings import RemoteEngineSettings

log = logging.getLogger(__name__)
DEFAULT_EOS = "<|endoftext|>"
CHARS_PER_TOKEN = 4  # a budget estimate when no tokenizer is available locally
_RETRY_STATUS = frozenset({429, 500, 502, 503, 504})


class _Retry(Exception):
    """A failure worth another attempt; the message says what happened."""


def _chunks(text: str, size: int) -> list[str]:
    return [text[index : index + size] for index in range(0, len(text), size)] or [""]


class RemoteTextEngine:
    def __init__(
        self, settings: RemoteEngineSettings, observer: EngineObserver | None = None
    ) -> None:
        self.settings = settings
        self.observer = observer
        self._session: aiohttp.ClientSession | None = None
        self._tokenizer: Any = None
        self.eos_text = DEFAULT_EOS
        self.prompt_budget = settings.max_history_tokens
        self.attempts = 0  # HTTP requests sent, retries included

    async def start(self) -> None:
        self._tokenizer = await asyncio.to_thread(self._load_tokenizer)
        if self._tokenizer is not None and self._tokenizer.eos_token:
            self.eos_text = self._tokenizer.eos_token
        headers = {}
        if self.settings.api_key:
            headers["Authorization"] = f"Bearer {self.settings.api_key}"
        timeout = aiohttp.ClientTimeout(total=self.settings.request_timeout_s)
        self._session = aiohttp.ClientSession(headers=headers, timeout=timeout)

    def _load_tokenizer(self) -> Any:
        """The model's tokenizer when it is on disk or cached: exact budgets."""
        from bot.engines.loading import load_tokenizer

        name = self.settings.tokenizer
        if not name:
            return None
        try:
            return load_tokenizer(name, True)
        except (OSError, ValueError):
            log.info("no local tokenizer for %s: estimating prompt length", name)
            return None

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    @property
    def ready(self) -> bool:
        return self._session is not None

    @property
    def queue_depth(self) -> int:
        return 0

    def prompt(self, turns: Sequence[str]) -> str:
        """Newest turns that fit the budget, each terminated by EOS."""
        if self._tokenizer is not None:
            ids = encode_dialogue(self._tokenizer, turns, self.prompt_budget)
            return str(self._tokenizer.decode(ids))
        pieces = fit_dialogue(
            turns,
            self.prompt_budget,
            lambda turn: [*_chunks(turn, CHARS_PER_TOKEN), self.eos_text],
        )
        return "".join(pieces)

    def _payload(self, turns: Sequence[str], conversation: str) -> dict[str, Any]:
        s = self.settings
        sampling = s.sampling
        payload: dict[str, Any] = {
            "model": s.model,
            "prompt": self.prompt(turns),
            "max_tokens": sampling.max_new_tokens,
            "temperature": 0.0 if sampling.greedy else sampling.temperature,
            "top_p": sampling.top_p,
            "stop": [self.eos_text],
            "stream": True,
        }
        if conversation:
            payload["user"] = conversation[:64]
        return payload

    async def stream(
        self, turns: Sequence[str], *, conversation: str = ""
    ) -> AsyncIterator[TextChunk]:
        if self._session is None:
            raise EngineUnavailable("the remote text engine is not running")
        payload = self._payload(turns, conversation)
        url = self.settings.url.rstrip("/") + "/completions"
        pieces: list[str] = []
        delay = self.settings.retry_backoff_s
        for attempt in range(self.settings.retries + 1):
            try:
                async for piece in self._attempt(url, payload):
                    pieces.append(piece)
                    yield TextChunk("".join(pieces).strip(), final=False)
                break
            except _Retry as exc:
                if pieces or attempt == self.settings.retries:
                    raise EngineUnavailable(f"text.remote_url {url} {exc}") from None
                log.warning("text.remote_url %s %s; retrying in %.1f s", url, exc, delay)
                await asyncio.sleep(delay)
                delay *= 2
        text = "".join(pieces)
        tokens = len(self._tokenizer(text)["input_ids"]) if self._tokenizer else len(pieces)
        if self.observer is not None and tokens:
            self.observer.count_tokens(tokens)
        yield TextChunk(clean_reply(text.replace(self.eos_text, "")), final=True, tokens=tokens)

    async def _attempt(self, url: str, payload: dict[str, Any]) -> AsyncIterator[str]:
        """One request: the completion's text pieces as they stream."""
        assert self._session is not None
        self.attempts += 1
        try:
            async with self._session.post(url, json=payload) as response:
                if response.status != 200:
                    detail = (await response.text())[:200]
                    message = f"answered {response.status}: {detail}"
                    if response.status in _RETRY_STATUS:
                        raise _Retry(message)
                    raise EngineUnavailable(f"text.remote_url {url} {message}")
                async for raw in response.content:
                    line = raw.decode("utf-8", "replace").strip()
                    if not line.startswith("data:"):
                        continue
                    data = line[5:].strip()
                    if data == "[DONE]":
                        return
                    choices = json.loads(data).get("choices") or [{}]
                    piece = choices[0].get("text") or ""
                    if piece:
                        yield piece
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise _Retry(f"failed: {type(exc).__name__}") from exc
        except json.JSONDecodeError as exc:
            raise EngineUnavailable(f"text.remote_url {url} sent invalid JSON") from exc

    async def generate(self, turns: Sequence[str], *, conversation: str = "") -> str:
        async for part in self.stream(turns, conversation=conversation):
            if part.final:
                return part.text
        raise EngineUnavailable("the remote engine ended without a reply")
