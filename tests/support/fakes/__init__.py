"""Local stand-ins for the platforms the bot talks to (test servers)."""
