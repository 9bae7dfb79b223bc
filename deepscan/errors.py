"""Errors meant for people: each carries a one-line message and the CLI exit code."""

from __future__ import annotations


class DeepscanError(Exception):
    """A failure the user can act on. The message names the file and what to do."""

    exit_code = 2


class ConfigError(DeepscanError, ValueError):
    """An impossible model or run configuration."""


class MediaError(DeepscanError):
    """A video that cannot be read or used."""


class WeightsError(DeepscanError):
    """A checkpoint or detector file that is missing, corrupt or refused."""


class OutputError(DeepscanError):
    """Writing results failed (a full disk, an unwritable file): the run ends with exit code 2."""
