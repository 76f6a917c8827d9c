"""Slash commands: /chat, /draw with its options, and one per entry of the
command registry (/reset, /forget, /stats, /cancel, /help, /human, ...).

Each one is turned into the text the manager already understands (`/draw
"a red fox" --seed 7`, `/reset`, `/ban telegram:123`, or the plain message
for /chat), so a slash command and a typed command behave the same
everywhere. `run` defers the interaction at once and follows up when the
answer is ready (see `DiscordChannel._run_command`). Personal commands answer
ephemerally; admin commands are hidden from members without Manage Server
(the bot still checks `[bot] admins`).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import discord
from discord import app_commands

from bot.commands import CommandRegistry, CommandSpec

#: (interaction, text for the manager, ephemeral)
CommandRunner = Callable[[discord.Interaction, str, bool], Awaitable[None]]
_QUOTE_PAIRS = (('"', '"'), ("“", "”"), ("«", "»"))


def quote(value: str) -> str:
    """One word for the `/draw` parser: the value in quotes that it cannot contain."""
    for opener, closer in _QUOTE_PAIRS:
        if closer not in value:
            return f"{opener}{value}{closer}"
    return '"' + value.replace('"', "'") + '"'


def draw_text(
    prompt: str,
    *,
    seed: int | None = None,
    steps: int | None = None,
    size: str | None = None,
    negative: str | None = None,
    guidance: float | None = None,
) -> str:
    """The `/draw` command line for these options; free text is quoted."""
    words = ["/draw", quote(prompt.strip())]
    if seed is not None:
        words += ["--seed", str(seed)]
    if steps is not None:
        words += ["--steps", str(steps)]
    if size and size.strip():
        words += ["--size", "".join(size.split())]
    if negative and negative.strip():
        words += ["--negative", quote(negative.strip())]
    if guidance is not None:
        words += ["--guidance", f"{guidance:g}"]
    return " ".join(words)


def _registry_command(
    spec: CommandSpec, run: CommandRunner
) -> app_commands.Command[Any, Any, None]:
    """A slash command for one registry entry; free text after the name
    becomes one optional `text` option."""
    description = (spec.summary[:1].upper() + spec.summary[1:])[:100]
    command: app_commands.Command[Any, Any, None]
    if spec.takes_args:

        async def with_text(interaction: discord.Interaction, text: str | None = None) -> None:
            words = f" {text.strip()}" if text and text.strip() else ""
            await run(interaction, f"/{spec.name}{words}", spec.personal)

        described = app_commands.describe(text=spec.usage[:100])(with_text)
        command = app_commands.Command(name=spec.name, description=description, callback=described)
    else:

        async def plain(interaction: discord.Interaction) -> None:
            await run(interaction, f"/{spec.name}", spec.personal)

        command = app_commands.Command(
            name=spec.name,
            description=description,
            callback=plain,
        )
    if spec.admin:
        command.default_permissions = discord.Permissions(manage_guild=True)
    return command


def build_command_tree(
    client: discord.Client, run: CommandRunner, commands: CommandRegistry
) -> app_commands.CommandTree:
    tree = app_commands.CommandTree(client)

    @tree.command(name="chat", description="Talk to me")
    @app_commands.describe(message="What you want to say")
    async def chat(interaction: discord.Interaction, message: str) -> None:
        await run(interaction, message, False)

    @tree.command(name="draw", description="Draw a picture")
    @app_commands.describe(
        prompt="What to draw",
        seed="Re-make a picture: the seed of an earlier one",
        steps="More steps: slower, more detail",
        size="Width x height, e.g. 512x512",
        negative="What to keep out of the picture",
        guidance="How closely to follow the prompt (e.g. 7.5)",
    )
    async def draw(
        interaction: discord.Interaction,
        prompt: str,
        seed: app_commands.Range[int, 0, 2**53] | None = None,
        steps: app_commands.Range[int, 1, 1000] | None = None,
        size: str | None = None,
        negative: str | None = None,
        guidance: app_commands.Range[float, 0.0, 30.0] | None = None,
    ) -> None:
        text = draw_text(
            prompt, seed=seed, steps=steps, size=size, negative=negative, guidance=guidance
        )
        await run(interaction, text, False)

    # Every other command comes from the registry that /help and Telegram's
    # command menu use too.
    for spec in commands:
        if spec.name not in ("chat", "draw"):
            tree.add_command(_registry_command(spec, run))

    return tree
