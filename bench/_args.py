"""Comma-separated benchmark arguments, checked before anything runs.

In: the parser, the flag, its text and what it may hold. Out: the parsed list, or the
parser's usage error (exit 2) naming the flag and what it takes, so a typo costs no
cell of a long run.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterable


def int_list(ap: argparse.ArgumentParser, flag: str, text: str, least: int | None = None,
             empty_ok: bool = False) -> list[int]:
    """Integers separated by commas; each at least `least` where given; none only where
    `empty_ok`."""
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        ap.error(f"{flag} takes integers separated by commas, got {text!r}")
    if not values and not empty_ok:
        ap.error(f"{flag} takes integers separated by commas, got none")
    if least is not None and any(v < least for v in values):
        ap.error(f"{flag} takes integers of at least {least}, got {text!r}")
    return values


def name_list(ap: argparse.ArgumentParser, flag: str, text: str, allowed: Iterable[str]) -> list[str]:
    """Names separated by commas, each one of `allowed`."""
    allowed = list(allowed)
    names = [v for v in text.split(",") if v.strip()]
    if not names or any(v not in allowed for v in names):
        ap.error(f"{flag} takes some of {', '.join(allowed)}, separated by commas; got {text!r}")
    return names
