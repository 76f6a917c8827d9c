"""Platform adapters: each module only translates platform <-> bot.messages.

Channels are found through the `aigc_bot.adapters` entry points in
pyproject.toml; adding a platform is one module here and one line there.
"""
