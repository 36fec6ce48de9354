"""Importing this module registers every personalization core with shared.methods.base.

A new method adds its import here (and nothing else changes in the runners)."""

from shared.methods.base import Core, register_core  # noqa: F401  (nonpersonalized is built in)
