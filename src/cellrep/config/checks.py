"""Small checks every schema uses: one message naming the allowed values or the bound."""

from __future__ import annotations

from cellrep.errors import CellrepError


def one_of(key: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise CellrepError(f"unknown {key} '{value}'", fix=f"set {key} to one of {list(allowed)}")


def at_least(key: str, value: float, least: float) -> None:
    if value < least:
        raise CellrepError(f"{key}={value} is below {least}", fix=f"use {key} >= {least}")
