"""Small checks every schema uses: one message naming the allowed values or the bound."""

from __future__ import annotations

from cellrep.errors import CellrepError


def one_of(key: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise CellrepError(f"unknown {key} '{value}'", fix=f"set {key} to one of {list(allowed)}")


def at_least(key: str, value: float, least: float) -> None:
    if value < least:
        raise CellrepError(f"{key}={value} is below {least}", fix=f"use {key} >= {least}")


def fraction_range(key: str, value) -> None:
    """``value`` is a range [low, high] with 0 < low <= high <= 1 (crop scales, mask ratios)."""
    lo_hi = list(value)
    if len(lo_hi) != 2 or not 0.0 < lo_hi[0] <= lo_hi[1] <= 1.0:
        raise CellrepError(f"{key}={lo_hi} is not a range [low, high] inside (0, 1]", fix="e.g. [0.32, 1.0]")
