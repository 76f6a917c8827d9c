"""Answers from the shop's own FAQ: loading, matching by meaning, the service.

`KnowledgeService.create(config, store, metrics)` reads `[knowledge] faq`
(None when it is empty); `decide(incoming, text, previous)` says whether to
answer an entry verbatim, offer the closest questions, or fall back. Torch
and transformers load only when the service starts.
"""

from bot.knowledge.faq import FaqEntry, FaqFile, KnowledgeError, load_faq
from bot.knowledge.service import KnowledgeDecision, KnowledgeService

__all__ = [
    "FaqEntry",
    "FaqFile",
    "KnowledgeDecision",
    "KnowledgeError",
    "KnowledgeService",
    "load_faq",
]
