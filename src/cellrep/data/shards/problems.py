"""Bad input met while sharding: its summary, ``problems.json`` and the threshold.

Owns the shard writer's bad-input report (docs/architecture.md, "Bad input": it never crashes
silently): a problem is a dict ``kind``, ``item``, ``detail`` — either listed by
a source while indexing (``source.problems``) or a site whose ``load`` raised
:class:`~cellrep.data.sources.base.UnreadableSite`. :func:`check_bad_input` writes
``problems.json`` into the shards directory, logs a summary naming the items, and
raises :class:`~cellrep.errors.CellrepError` above ``max_bad_fraction`` of all
items. The writer itself is :func:`cellrep.data.shards.writer.write_shards`.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from cellrep.errors import CellrepError
from cellrep.io import atomic_write_bytes

log = logging.getLogger("cellrep.data.shards.writer")  # the writer's logger: these messages are its report

PROBLEMS = "problems.json"


def bad_input_counts(problems: list[dict], total: int) -> dict:
    """``count``, ``fraction`` of ``total`` and ``by_kind`` counts (``manifest["bad_input"]``)."""
    kinds: dict[str, int] = {}
    for p in problems:
        kinds[p["kind"]] = kinds.get(p["kind"], 0) + 1
    return {"count": len(problems), "fraction": len(problems) / max(total, 1), "by_kind": kinds}


def bad_input_summary(problems: list[dict], total: int, show: int = 5) -> str:
    """Counts per kind and the first ``show`` items of each, one line per kind."""
    counts = bad_input_counts(problems, total)
    lines = [f"bad input: {counts['count']} of {total} items ({counts['fraction']:.2%})"]
    for kind, n in sorted(counts["by_kind"].items()):
        items = [p for p in problems if p["kind"] == kind]
        named = "; ".join(f"{p['item']}" + (f" ({p['detail']})" if p.get("detail") else "") for p in items[:show])
        lines.append(f"  {kind}: {n} — {named}" + (" ..." if n > show else ""))
    return "\n".join(lines)


def check_bad_input(
    problems: list[dict], total: int, max_fraction: float, name: str, out_dir: Path, final: bool
) -> None:
    """Summarize bad input (at the end) and fail above ``max_fraction`` of all items."""
    if not problems:
        if final:
            (out_dir / PROBLEMS).unlink(missing_ok=True)  # left by an earlier run of this dataset
        return
    too_many = len(problems) > max_fraction * total
    if final or too_many:
        atomic_write_bytes(out_dir / PROBLEMS, json.dumps({"total": total, "problems": problems}, indent=1).encode())
    if final and not too_many:
        log.warning("%s: skipped %s\n  full list: %s", name, bad_input_summary(problems, total), out_dir / PROBLEMS)
    if too_many:
        raise CellrepError(
            f"{name}: too much bad input, more than data.max_bad_fraction={max_fraction:g} — "
            f"{bad_input_summary(problems, total, show=20)}\n  full list: {out_dir / PROBLEMS}",
            fix="repair or remove the items listed, or raise data.max_bad_fraction to skip them "
            "(rerunning resumes: finished shards are kept)",
        )
