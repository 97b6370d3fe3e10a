"""Shared helpers of the CPU benchmarks: a throwaway RxRx1-layout dataset, timing, tables.

The machines are shared and noisy, so every script measures the things it
compares side by side, alternating, several times, and reports medians (and
the median of per-repeat ratios, which cancels slow drifts in machine load).
Datasets are generated into a temp dir and never committed.
"""

from __future__ import annotations

import cellrep  # noqa: F401  (torchvision compat before timm/lightning)

# isort: split
import os
import platform
import statistics
import time
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

CHANNELS = 6


def machine() -> str:
    """One line naming the machine, for the tables in docs/PERFORMANCE.md."""
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return (
        f"{cpu}, {len(os.sched_getaffinity(0))} usable cores, python {platform.python_version()}, "
        f"torch {torch.__version__}"
    )


def site_image(rng: np.random.Generator, size: int = 512, channels: int = CHANNELS) -> np.ndarray:
    """A microscopy-like C×S×S uint8 site: dark background, smooth blobs, shot-like noise.

    Pure noise would make every compressed encoding look useless and PNG decode
    unrealistically slow/fast; this compresses roughly like fluorescence images.
    """
    low = rng.random((channels, size // 32, size // 32), dtype=np.float32)
    smooth = np.repeat(np.repeat(low, 32, axis=1), 32, axis=2)
    blobs = np.clip(smooth - 0.55, 0, None) * 400
    noise = rng.normal(0, 4, (channels, size, size)).astype(np.float32)
    return np.clip(blobs + 10 + noise, 0, 255).astype(np.uint8)


def make_rxrx1(root: Path, n_sites: int, size: int = 512, seed: int = 0, plates: int = 2) -> Path:
    """Write ``n_sites`` sites in the RxRx1 layout (one 8-bit PNG per channel + metadata.csv)."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n_sites):
        plate, well = 1 + i % plates, f"B{(i // plates) // 2 + 2:02d}"
        site = 1 + (i // plates) % 2
        folder = root / "images" / "EXP-01" / f"Plate{plate}"
        folder.mkdir(parents=True, exist_ok=True)
        img = site_image(rng, size)
        for c in range(CHANNELS):
            Image.fromarray(img[c]).save(folder / f"{well}_s{site}_w{c + 1}.png", compress_level=6)
        control = (i // plates) % 4 == 0
        rows.append(
            {
                "site_id": f"EXP-01_{plate}_{well}_{site}",
                "well_id": f"EXP-01_{plate}_{well}",
                "cell_type": "HUVEC",
                "dataset": "train",
                "experiment": "EXP-01",
                "plate": plate,
                "well": well,
                "site": site,
                "well_type": "negative_control" if control else "treatment",
                "sirna": "EMPTY" if control else f"s{i % 16}",
                "sirna_id": i % 16,
            }
        )
    pd.DataFrame(rows).to_csv(root / "metadata.csv", index=False)
    return root


def shard(root: Path, out: Path, samples_per_shard: int = 32) -> dict:
    from cellrep.data.shards.writer import write_shards
    from cellrep.data.sources.rxrx1 import RxRx1Source

    return write_shards(RxRx1Source(root), out, samples_per_shard=samples_per_shard, progress=False)


def rate(batches, n_batches: int, warmup: int = 2) -> float:
    """Samples/s of an iterator of batches (dicts with 'image'), excluding ``warmup`` batches
    (worker start-up, first shard opens)."""
    it = iter(batches)
    for _ in range(warmup):
        next(it)
    t0, n = time.perf_counter(), 0
    for _ in range(n_batches):
        n += len(next(it)["image"])
    return n / (time.perf_counter() - t0)


def median(xs) -> float:
    return statistics.median(xs)


def table(header: list[str], rows: list[list]) -> str:
    """A GitHub markdown table (pasted as is into docs/PERFORMANCE.md)."""

    def fmt(v):
        return f"{v:,.1f}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(fmt(v) for v in r) + " |" for r in rows]
    return "\n".join(lines)
