"""Governance's own error: a setting it cannot work with (found at start-up)."""

from __future__ import annotations


class GovernanceError(Exception):
    """A governance setting is unusable (bad classifier, bad pattern); the
    message names the key to fix."""
