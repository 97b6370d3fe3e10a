"""Loader throughput: the cellrep shard loader vs a per-file PNG loader vs the decode ceiling.

docs/PERFORMANCE.md / issue 7 bar: samples/s of the shard loader (6×512×512 sites →
random 256 crop/flip/rot90 → plate-normalized float32 batches) ≥ 10× a
per-file PNG loader of the same sites in the RxRx1 layout (the way users load
RxRx1 today), and ≥ 70% of the raw decode ceiling of the shard encoding
(``np.load`` of in-memory ``.npy`` bytes, nothing else), at 1 and 2 worker
processes. All three are measured in one run, alternating, ``--repeats``
times; the table reports medians and the median of per-repeat ratios.

The shard loader's workers hand out uint8 crops; ``finish_batch`` (what
Lightning runs in ``on_after_batch_transfer``) normalizes each batch on the
device. Column (1) is CPU-only training: flips/rot90 in the workers
(``augment_on_device=False``) and ``finish_batch`` on the CPU in the main
process, i.e. normalized float batches like the PNG loader's. Column (2) is
what a GPU run asks of the CPU: the loader alone, with flips/rot90 left to
the device (``augment_on_device=True``, the default when CUDA is available).

Files are read from a temp dir that is in the page cache after the first
pass, so this compares CPU cost (decode, crop, normalize, IPC), not disks.

    python benchmarks/loader.py            # ~2 min on 2 cores
    python benchmarks/loader.py --quick    # seconds: checks that it runs
"""

from __future__ import annotations

import argparse
import io
import multiprocessing as mp
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import cellrep  # noqa: F401, E402  (torchvision compat before lightning/timm)

# isort: split
import numpy as np  # noqa: E402
import torch  # noqa: E402
from _common import machine, make_rxrx1, median, rate, shard, table  # noqa: E402
from PIL import Image  # noqa: E402
from torch.utils.data import DataLoader, Dataset  # noqa: E402

from cellrep.data.loading.datamodule import CellDataModule  # noqa: E402
from cellrep.data.loading.streams import TrainLoader, TrainStream, _one_thread  # noqa: E402
from cellrep.data.loading.transforms import normalize, random_crop_flip_rot90  # noqa: E402

SPLIT = {"name": "random", "test_fraction": 0.05, "val_fraction": 0.0}
# The stream's shuffle buffer reads two samples per batch slot until it is full; the timed window
# must start after that. 128 keeps the warm-up short; steady-state cost per sample is the same.
SHUFFLE_BUFFER = 128


class PngSites(Dataset):
    """(a) The per-file baseline: six PNGs per site read with PIL, same crop and normalization."""

    def __init__(self, dm: CellDataModule, root: Path, rows: np.ndarray):
        self.dm, self.rows = dm, rows
        self.paths = [
            [root / "images" / r.experiment / f"Plate{r.plate}" / f"{r.well}_s{r.site}_w{c}.png" for c in range(1, 7)]
            for r in dm.index.iloc[rows].itertuples()
        ]

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int):
        img = torch.from_numpy(np.stack([np.asarray(Image.open(p)) for p in self.paths[i]]))
        return random_crop_flip_rot90(img, self.dm.crop_size).contiguous(), int(self.rows[i])

    def collate(self, items):
        rows = torch.tensor([r for _, r in items])
        plates = torch.from_numpy(self.dm._plate_idx[rows.numpy()])
        stats = (self.dm._stats_mean[plates], self.dm._stats_std[plates])
        return {"image": normalize(torch.stack([x for x, _ in items]), "plate_controls", stats), "index": rows}


def shard_loader(dm: CellDataModule, workers: int, finish: bool = True):
    """(the subject) The training loader exactly as ``train_dataloader`` builds it, made endless
    (its stream is resampled anyway; only the per-epoch batch count is raised). ``finish``: each
    batch also goes through ``finish_batch`` (normalized float32, here on the CPU), as Lightning does.
    ``dm.augment_on_device`` says where flips/rot90 run: in ``finish_batch`` (a GPU run) or in the workers."""
    stream = TrainStream(dm, dm._stage_rows["train"], 0, 1)
    stream.num_batches = 10**6
    loader = TrainLoader(stream, workers, persistent_workers=False, pin_memory=False, finish_batch=dm.finish_batch)
    return (loader.finish_batch(b) for b in loader) if finish else loader


def png_loader(dm: CellDataModule, root: Path, workers: int):
    ds = PngSites(dm, root, dm._stage_rows["train"])
    sampler = torch.utils.data.RandomSampler(ds, replacement=True, num_samples=10**6)
    return DataLoader(
        ds,
        batch_size=dm.batch_size,
        sampler=sampler,
        num_workers=workers,
        collate_fn=ds.collate,
        worker_init_fn=_one_thread,
    )


_PAYLOADS: list[bytes] = []


def _decode_n(n: int) -> int:
    for i in range(n):
        np.load(io.BytesIO(_PAYLOADS[i % len(_PAYLOADS)]), allow_pickle=False)
    return n


def ceiling(pool, workers: int, n: int) -> float:
    """(b) Samples/s of ``workers`` processes doing nothing but decode in-memory .npy payloads."""
    pool.map(_decode_n, [max(n // 10, 1)] * workers)  # warm
    t0 = time.perf_counter()
    done = sum(pool.map(_decode_n, [n] * workers))
    return done / (time.perf_counter() - t0)


def load_payloads(dm: CellDataModule) -> list[bytes]:
    out = []
    for row in dm.index.itertuples():
        with open(dm.shards_dir / row.shard, "rb") as f:
            f.seek(row.npy_offset)
            out.append(f.read(row.npy_size))
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny sizes: checks that the script runs")
    p.add_argument("--sites", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--batches", type=int, default=24, help="timed batches per shard-loader measurement")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    a = p.parse_args(argv)
    if a.quick:
        a.sites, a.batch_size, a.batches, a.repeats = 12, 4, 2, 1
    png_batches = max(2, a.batches // 12)  # PNG is 10-100× slower: fewer batches, similar seconds
    torch.set_num_threads(1)
    load0 = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="cellrep-bench-") as tmp:
        tmp = Path(tmp)
        t0 = time.perf_counter()
        make_rxrx1(tmp / "rxrx1", a.sites)
        shard(tmp / "rxrx1", tmp / "shards")
        print(f"# generated and sharded {a.sites} sites in {time.perf_counter() - t0:.0f}s", flush=True)
        dms = {
            on_device: CellDataModule(
                tmp / "shards",
                SPLIT,
                batch_size=a.batch_size,
                num_workers=1,
                crop_size=256,
                normalization="plate_controls",
                shuffle_buffer=SHUFFLE_BUFFER,
                augment_on_device=on_device,
            )
            for on_device in (False, True)
        }
        dm = dms[False]  # CPU-only training: flips/rot90 in the workers
        warm = -(-SHUFFLE_BUFFER // a.batch_size) + 2
        _PAYLOADS[:] = load_payloads(dm)
        res: dict[tuple, list[float]] = {}
        ctx = mp.get_context("fork")
        pools = {w: ctx.Pool(w) for w in a.workers}
        try:
            for _ in range(a.repeats):
                for w in a.workers:
                    res.setdefault(("shards", w), []).append(rate(shard_loader(dm, w), a.batches, warm))
                    # a GPU run: flips/rot90 and normalization happen on the device, after the loader
                    res.setdefault(("uint8", w), []).append(rate(shard_loader(dms[True], w, False), a.batches, warm))
                    res.setdefault(("png", w), []).append(rate(png_loader(dm, tmp / "rxrx1", w), png_batches, 1))
                    res.setdefault(("ceiling", w), []).append(ceiling(pools[w], w, 4 * a.batches * a.batch_size))
        finally:
            for pool in pools.values():
                pool.close()
    rows = []
    for w in a.workers:
        s, u, g, c = res["shards", w], res["uint8", w], res["png", w], res["ceiling", w]
        ratio = lambda xs, ys: median([x / y for x, y in zip(xs, ys)])  # noqa: E731
        rows.append(
            [
                w,
                median(s),
                median(u),
                median(g),
                median(c),
                ratio(s, g),
                ratio(u, g),
                f"{100 * ratio(s, c):.0f}%",
                f"{100 * ratio(u, c):.0f}%",
            ]
        )
    print(
        f"# machine: {machine()}; load average {' '.join(f'{x:.1f}' for x in os.getloadavg())} "
        f"(at start: {' '.join(f'{x:.1f}' for x in load0)})"
    )
    print(
        f"# {a.sites} sites 6×512×512 → crop 256, batch {a.batch_size}, {a.repeats} repeats (medians); "
        "(1) = CPU-only training: flips in the workers, loader + finish_batch on the CPU (main process); "
        "(2) = a GPU run: loader alone (flips/rot90 and normalization on the device)"
    )
    print(
        table(
            [
                "workers",
                "shard loader samples/s (1) float",
                "(2) uint8",
                "(a) PNG per-file samples/s",
                "(b) npy decode ceiling samples/s",
                "(1) ÷ (a) (bar ≥ 10×)",
                "(2) ÷ (a) (bar ≥ 10×)",
                "(1) ÷ (b) (bar ≥ 70%)",
                "(2) ÷ (b) (bar ≥ 70%)",
            ],
            rows,
        )
    )


if __name__ == "__main__":
    main()
