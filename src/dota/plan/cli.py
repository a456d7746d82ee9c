"""The plan commands of ``dota`` (``dota dose``, ``dota plan``), registered by :func:`dota.cli.build_parser`."""

from __future__ import annotations

import argparse
from collections.abc import Callable


def add_commands(sub: argparse._SubParsersAction, add_common: Callable[..., None]) -> None:
    """Add the plan subcommands to the ``dota`` parser (none yet)."""
