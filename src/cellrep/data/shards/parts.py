"""Sharding split by plate into N parts that run at once, e.g. one SLURM job each (docs/data.md).

Every part computes the same full plan (:func:`~cellrep.data.shards.writer.plan_shards`, which does
not depend on the part count), takes the plates of its part (plate ``j`` of the plan's plate order
goes to part ``j % N``) and writes their shards and sidecars exactly as one process would. Parts share
a directory, possibly over NFS, so they take no lock: each writes only its own files, each atomically
(temp file + rename), and then its done-marker ``parts/part-<i>-of-<N>.json``.

A part that finds every marker of this plan merges: ``index.parquet`` and ``manifest.json`` come from
the sidecars of all shards through the same function one process uses, so they are equal to a
one-process run's. Two parts finishing at once may both merge; they write the same bytes, each file
atomically. Where a filesystem's directory cache hides a marker from both,
``cellrep-shard data.shard_merge=true`` merges (it checks the sidecars, not the markers, and names the
unfinished parts). Shard names do not depend on N, so parts of different N may even be mixed.
"""

from __future__ import annotations

import logging
from pathlib import Path

from cellrep.data.shards.writer import (
    _finish,
    _finished_sidecar,
    _read_json,
    _setup,
    _shape,
    _start_plan,
    _up_to_date,
    _write_json,
    _write_specs,
    check_bad_input,
)
from cellrep.errors import CellrepError

log = logging.getLogger(__name__)
PARTS_DIR = "parts"

__all__ = ["PARTS_DIR", "merge_parts", "part_of_shards", "write_part"]


def part_of_shards(plan: list[dict], parts: int) -> dict[str, int]:
    """Shard name → its part: whole plates, dealt round-robin in the plan's (sorted) plate order."""
    plates = list(dict.fromkeys((s["experiment"], s["plate"]) for s in plan))
    part_of_plate = {p: j % parts for j, p in enumerate(plates)}
    return {s["name"]: part_of_plate[(s["experiment"], s["plate"])] for s in plan}


def marker_path(out_dir: Path, part: int, parts: int) -> Path:
    return Path(out_dir) / PARTS_DIR / f"part-{part:04d}-of-{parts:04d}.json"


def _unfinished_parts(out_dir: Path, parts: int, job: dict, fingerprint: str) -> list[int]:
    """Parts without a done-marker of this plan and dataset (markers of an earlier plan do not count)."""
    missing = []
    for i in range(parts):
        m = _read_json(marker_path(out_dir, i, parts))
        if not m or m.get("plan_digest") != job["plan_digest"] or m.get("fingerprint") != fingerprint:
            missing.append(i)
    return missing


def _check_part(part: int, parts: int) -> None:
    if parts < 1 or not 0 <= part < parts:
        raise CellrepError(f"shard part {part} of {parts}", fix="use data.shard_part=0..data.shard_parts-1")


def write_part(
    source,
    out_dir: Path,
    part: int,
    parts: int,
    samples_per_shard: int = 256,
    num_workers: int = 0,
    progress: bool = True,
    max_bad_fraction: float = 0.01,
    encoding: str = "npy",
) -> dict:
    """Write part ``part`` of ``parts``; merge when it is the last to finish.

    Returns ``{"part", "parts", "shards", "unfinished", "manifest"}``: ``shards`` of this part,
    ``unfinished`` the parts still without a done-marker, ``manifest`` the merged one (None until then).
    A rerun resumes: shards with a finished sidecar are not rewritten."""
    _check_part(part, parts)
    out_dir = Path(out_dir)
    job = _setup(source, out_dir, samples_per_shard, encoding)
    of = part_of_shards(job["plan"], parts)
    mine = [s for s in job["plan"] if of[s["name"]] == part]
    result = {"part": part, "parts": parts, "shards": len(mine), "unfinished": [], "manifest": None}
    if (old := _up_to_date(out_dir, job)) is not None:
        return result | {"manifest": old}
    check_bad_input(job["problems"], job["total"], max_bad_fraction, source.name, out_dir, final=False)
    _start_plan(out_dir, source, job["plan"], samples_per_shard, own=mine)
    source_info = _describe(source)  # before writing, as write_shards: it may prepare the workers' state
    shape = _shape(source, job)
    _write_specs(source, job, mine, out_dir, shape, num_workers, progress)
    marker = {"part": part, "parts": parts, "plan_digest": job["plan_digest"], "fingerprint": source.fingerprint}
    _write_json(marker_path(out_dir, part, parts), marker | {"shards": [s["name"] for s in mine]})
    unfinished = _unfinished_parts(out_dir, parts, job, source.fingerprint)
    if unfinished:
        log.info("part %d of %d done; waiting for parts %s", part, parts, unfinished)
        return result | {"unfinished": unfinished}
    return result | {"manifest": _merge(source, out_dir, job, parts, max_bad_fraction, source_info)}


def merge_parts(
    source,
    out_dir: Path,
    parts: int,
    samples_per_shard: int = 256,
    max_bad_fraction: float = 0.01,
    encoding: str = "npy",
) -> dict:
    """Write ``index.parquet`` and ``manifest.json`` of finished parts (idempotent); return the manifest.

    Refuses, naming the parts (of ``parts``) whose shards are not all finished."""
    out_dir = Path(out_dir)
    job = _setup(source, out_dir, samples_per_shard, encoding)
    if (old := _up_to_date(out_dir, job)) is not None:
        return old
    return _merge(source, out_dir, job, parts, max_bad_fraction, _describe(source))


def _describe(source):
    return source.describe() if callable(getattr(source, "describe", None)) else None


def _merge(source, out_dir: Path, job: dict, parts: int, max_bad_fraction: float, source_info) -> dict:
    plan = job["plan"]
    sidecars = {
        s["name"]: side for s in plan if (side := _finished_sidecar(out_dir, s, source.fingerprint, job["encoding"]))
    }
    missing = [s["name"] for s in plan if s["name"] not in sidecars]
    if missing:
        of = part_of_shards(plan, parts)
        unfinished = sorted({of[name] for name in missing})
        raise CellrepError(
            f"{out_dir}: parts {unfinished} of {parts} are not finished "
            f"({len(missing)} of {len(plan)} shards missing, e.g. {missing[0]})",
            fix=f"run cellrep-shard data.shard_parts={parts} data.shard_part=<i> for each of those parts "
            "(a rerun resumes), then merge again",
        )
    return _finish(source, job, sidecars, out_dir, _shape(source, job), source_info, max_bad_fraction)
