"""The bot never answers over a person: an operator who claims a conversation
while the bot is still writing a reply to it wins — the reply is neither
stored nor sent."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from sqlalchemy import text
from support.engine_doubles import ScriptedEngine

from bot.config import Config
from bot.manager import ConversationManager
from bot.messages import Incoming, Text
from storage import Store


async def test_a_claim_while_the_reply_is_written_drops_the_reply(
    make_config: Callable[..., Config], tmp_path: object
) -> None:
    config = make_config()
    store = await Store.open(config.storage.url)
    engine = ScriptedEngine()
    engine.release = asyncio.Event()
    manager = ConversationManager(config, store, engine)
    try:
        question = Incoming("web", "w1", "w1", "visitor", "is my order late?")
        answering = asyncio.create_task(_collect(manager, question))
        await engine.started.wait()  # the bot is writing its reply
        async with store.engine.begin() as connection:  # an operator claims it now
            await connection.execute(
                text("UPDATE conversations SET handoff_state = 'claimed', handoff_operator = 'sam'")
            )
        engine.release.set()
        replies = await answering
        [conversation] = await store.people.export("web", "w1")
    finally:
        await store.close()
    assert not [r for r in replies if isinstance(r, Text) and r.final]
    assert [(m.role, m.text) for m in conversation.messages] == [("user", "is my order late?")]


async def _collect(manager: ConversationManager, incoming: Incoming) -> list[object]:
    return [reply async for reply in manager.handle(incoming)]
