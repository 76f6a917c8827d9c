"""The whole configuration: one model per `config.toml` section."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, PrivateAttr

from bot.config.core import BotSection, LimitsSection, StorageSection
from bot.config.engines import DrawSection, TextSection
from bot.config.governance import AccessSection, ModerationSection
from bot.config.handoff import HandoffSection
from bot.config.knowledge import KnowledgeSection
from bot.config.platforms import DiscordSection, TelegramSection, WebSection
from bot.config.section import Section


class Config(Section):
    bot: BotSection = Field(default_factory=BotSection)
    storage: StorageSection = Field(default_factory=StorageSection)
    text: TextSection = Field(default_factory=TextSection)
    draw: DrawSection = Field(default_factory=DrawSection)
    limits: LimitsSection = Field(default_factory=LimitsSection)
    knowledge: KnowledgeSection = Field(default_factory=KnowledgeSection)
    handoff: HandoffSection = Field(default_factory=HandoffSection)
    access: AccessSection = Field(default_factory=AccessSection)
    moderation: ModerationSection = Field(default_factory=ModerationSection)
    web: WebSection = Field(default_factory=WebSection)
    telegram: TelegramSection = Field(default_factory=TelegramSection)
    discord: DiscordSection = Field(default_factory=DiscordSection)

    #: The folder of the config file it was read from (the working dir if none).
    _source_dir: Path | None = PrivateAttr(default=None)

    def resolve_path(self, path: Path) -> Path:
        """Relative data paths are relative to the working directory."""
        return path if path.is_absolute() else Path.cwd() / path

    def relative_to_config(self, path: str | Path) -> Path:
        """Files the config names (e.g. `knowledge.faq`) are relative to its folder."""
        path = Path(path).expanduser()
        if path.is_absolute():
            return path
        return (self._source_dir or Path.cwd()) / path

    def with_source_dir(self, folder: Path) -> Config:
        self._source_dir = folder
        return self
