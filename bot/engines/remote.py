"""Text from an OpenAI-compatible completions server (vLLM, llama.cpp server, TGI).

This is the scale-out path for inference: several bot processes share one GPU
server. The dialogue format is the same as the local engine's: turns joined by
the model's EOS text, and generation stops at the next EOS.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator, Sequence
from typing import Any

import aiohttp

from bot.config import TextSection, read_secret
from bot.engines import EngineUnavailable
from bot.messages import Text

log = logging.getLogger(__name__)
DEFAULT_EOS = "<|endoftext|>"
CHARS_PER_TOKEN = 4  # a budget estimate when no tokenizer is available locally


class RemoteTextEngine:
    def __init__(self, config: TextSection, metrics: Any = None) -> None:
        self.config = config
        self.metrics = metrics
        self._session: aiohttp.ClientSession | None = None
        self._tokenizer: Any = None
        self.eos_text = DEFAULT_EOS
        self.prompt_budget = config.max_history_tokens

    async def start(self) -> None:
        self._tokenizer = await self._load_tokenizer()
        if self._tokenizer is not None and self._tokenizer.eos_token:
            self.eos_text = self._tokenizer.eos_token
        headers = {}
        key = read_secret(self.config.api_key_env)
        if key is not None:
            headers["Authorization"] = f"Bearer {key.get_secret_value()}"
        timeout = aiohttp.ClientTimeout(total=self.config.request_timeout_s)
        self._session = aiohttp.ClientSession(headers=headers, timeout=timeout)

    async def _load_tokenizer(self) -> Any:
        """The model's tokenizer when it is on disk or cached: exact budgets."""
        import asyncio

        def load() -> Any:
            from transformers import AutoTokenizer

            try:
                return AutoTokenizer.from_pretrained(self.config.model, local_files_only=True)
            except (OSError, ValueError):
                return None

        tokenizer = await asyncio.to_thread(load)
        if tokenizer is None:
            log.info("no local tokenizer for %s: estimating prompt length", self.config.model)
        return tokenizer

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

    def _fit(self, turns: Sequence[str]) -> str:
        """Newest turns that fit the budget, joined and terminated by EOS."""
        kept: list[str] = []
        used = 0
        for turn in reversed(turns):
            if self._tokenizer is not None:
                cost = len(self._tokenizer(turn, add_special_tokens=False)["input_ids"]) + 1
            else:
                cost = len(turn) // CHARS_PER_TOKEN + 1
            if used + cost > self.prompt_budget and kept:
                break
            kept.append(turn)
            used += cost
        return "".join(turn + self.eos_text for turn in reversed(kept))

    async def stream(self, turns: Sequence[str], *, conversation: str = "") -> AsyncIterator[Text]:
        if self._session is None:
            raise EngineUnavailable("the remote text engine is not running")
        c = self.config
        payload = {
            "model": c.remote_model or c.model,
            "prompt": self._fit(turns),
            "max_tokens": c.max_new_tokens,
            "temperature": 0.0 if c.greedy else c.temperature,
            "top_p": c.top_p,
            "stop": [self.eos_text],
            "stream": True,
        }
        if conversation:
            payload["user"] = conversation[:64]
        url = c.remote_url.rstrip("/") + "/completions"
        text = ""
        try:
            async with self._session.post(url, json=payload) as response:
                if response.status != 200:
                    detail = (await response.text())[:200]
                    raise EngineUnavailable(
                        f"text.remote_url {url} answered {response.status}: {detail}"
                    )
                async for raw in response.content:
                    line = raw.decode("utf-8", "replace").strip()
                    if not line.startswith("data:"):
                        continue
                    data = line[5:].strip()
                    if data == "[DONE]":
                        break
                    choices = json.loads(data).get("choices") or [{}]
                    piece = choices[0].get("text") or ""
                    if piece:
                        text += piece
                        yield Text(text.strip(), final=False)
        except (aiohttp.ClientError, TimeoutError, json.JSONDecodeError) as exc:
            raise EngineUnavailable(f"text.remote_url {url} failed: {type(exc).__name__}") from exc
        if self.metrics is not None and self._tokenizer is not None:
            self.metrics.generated_tokens.inc(len(self._tokenizer(text)["input_ids"]))
        cleaned = " ".join(text.replace(self.eos_text, "").split())
        yield Text(cleaned or c.fallback_reply, final=True)

    async def generate(self, turns: Sequence[str], *, conversation: str = "") -> str:
        async for part in self.stream(turns, conversation=conversation):
            if part.final:
                return part.text
        raise EngineUnavailable("the remote engine ended without a reply")
