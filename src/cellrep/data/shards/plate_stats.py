"""Per-plate per-channel pixel statistics of a shards directory (docs/data.md, "Shards").

Owns the manifest's ``plate_stats`` (keyed by :func:`plate_key`) and
``global_stats``: mean and std per channel of each plate's negative-control
sites (all its sites when it has no control), used by ``plate_controls``
normalization. The shard writer adds each image's exact integer sums into its
shard's sidecar (:func:`image_sums`, :func:`add_sums`), so the statistics are
order-independent and need no re-read on resume; :func:`manifest_stats` reduces
the sidecars to means and stds at the end.
"""

from __future__ import annotations

import logging
import math

import numpy as np

log = logging.getLogger("cellrep.data.shards.writer")  # the writer's logger: these warnings are part of its report


def plate_key(experiment: str, plate: int) -> str:
    """Key of ``manifest['plate_stats']``."""
    return f"{experiment}/{int(plate)}"


def empty_sums(c: int) -> dict:
    """Zero sums over ``c`` channels: ``sites``, ``pixels`` (per channel), ``sum`` and ``sumsq``."""
    return {"sites": 0, "pixels": 0, "sum": [0] * c, "sumsq": [0] * c}


def add_sums(acc: dict, other: dict) -> None:
    """Add ``other``'s sums into ``acc`` in place."""
    acc["sites"] += other["sites"]
    acc["pixels"] += other["pixels"]
    acc["sum"] = [a + b for a, b in zip(acc["sum"], other["sum"])]
    acc["sumsq"] = [a + b for a, b in zip(acc["sumsq"], other["sumsq"])]


def image_sums(img: np.ndarray) -> tuple[list[int], list[int]]:
    """Exact per-channel sum and sum of squares (integers: order-independent)."""
    v = np.arange(256, dtype=np.int64)
    s, sq = [], []
    for ch in img:
        h = np.bincount(ch.ravel(), minlength=256).astype(np.int64)
        s.append(int(h @ v))
        sq.append(int(h @ (v * v)))
    return s, sq


def moments(acc: dict) -> tuple[list[float], list[float]]:
    """Per-channel mean and (population) std of the sums."""
    n = acc["pixels"]
    mean = [s / n for s in acc["sum"]]
    # exact integer variance: (n·Σx² − (Σx)²) / n²
    std = [math.sqrt(max(n * q - s * s, 0) / (n * n)) for s, q in zip(acc["sum"], acc["sumsq"])]
    return mean, std


def manifest_stats(plan: list[dict], sidecars: dict[str, dict], c: int) -> tuple[dict, dict]:
    """``(plate_stats, global_stats)`` of the manifest from the shards' sidecars."""
    plates: dict[str, dict] = {}
    total = empty_sums(c)
    for spec in plan:
        side = sidecars[spec["name"]]
        p = plates.setdefault(
            plate_key(spec["experiment"], spec["plate"]), {"all": empty_sums(c), "controls": empty_sums(c)}
        )
        add_sums(p["all"], side["all"])
        add_sums(p["controls"], side["controls"])
        add_sums(total, side["all"])
    stats = {}
    for key, p in plates.items():
        if not p["all"]["sites"]:  # every site of the plate was unreadable: nothing to normalize
            log.warning("plate %s has no readable site: it has no normalization stats", key)
            continue
        use = p["controls"] if p["controls"]["sites"] else p["all"]
        if not p["controls"]["sites"]:
            log.warning("plate %s has no negative-control sites: its normalization stats use all its sites", key)
        mean, std = moments(use)
        stats[key] = {"mean": mean, "std": std, "num_controls": p["controls"]["sites"]}
    mean, std = moments(total)
    return stats, {"mean": mean, "std": std}
