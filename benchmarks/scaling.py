"""Scaling of cost with work: shard writer samples/s vs dataset size, and loader samples/s vs
number of shards and workers, in one table. Nothing should be super-linear: samples/s
roughly flat as the dataset grows (per-sample cost constant), and up with workers.

The writer reads from an in-memory source (a few pre-generated 6×512×512 sites
cycled), so the figure is the writer's own cost (npy encode, tar, exact
stats, fsync'd atomic files), not PNG decoding. Shards hold ``--per-shard``
sites, so a bigger dataset has proportionally more shards. The loader is the
training stream (as in ``loader.py``) over each dataset at 1 and 2 workers, delivering uint8
batches as for a GPU run: the part that runs in the workers and scales with them. Flips/rot90
and normalization (``finish_batch``) run once per batch on the device whatever the data size;
``loader.py`` measures them on the CPU.

    python benchmarks/scaling.py [--quick]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import cellrep  # noqa: F401, E402  (torchvision compat before lightning/timm)

# isort: split
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402
from _common import machine, median, rate, site_image, table  # noqa: E402
from loader import SHUFFLE_BUFFER, SPLIT, shard_loader  # noqa: E402

from cellrep.data.loading.datamodule import CellDataModule  # noqa: E402
from cellrep.data.shards.writer import write_shards  # noqa: E402
from cellrep.data.sources.rxrx1 import _to_canonical  # noqa: E402


class ArraySource:
    """An ImageSource whose ``load`` costs nothing: measures the writer alone."""

    channel_names = ("c1", "c2", "c3", "c4", "c5", "c6")

    def __init__(self, n: int, images: list[np.ndarray]):
        self.name, self.fingerprint, self.images = f"bench-{n}", f"bench-{n}", images
        raw = pd.DataFrame(
            {
                "site_id": [f"E_1_{i:05d}_1" for i in range(n)],
                "cell_type": "HUVEC",
                "experiment": "E",
                "plate": [str(1 + i % 2) for i in range(n)],
                "well": [f"W{i:05d}" for i in range(n)],
                "site": "1",
                "well_type": ["negative_control" if i % 8 < 2 else "treatment" for i in range(n)],
                "sirna": [f"s{i % 16}" if i % 8 >= 2 else "EMPTY" for i in range(n)],
            }
        )
        self.metadata = _to_canonical(raw, self.name)
        self._row = {s: i for i, s in enumerate(raw["site_id"])}

    def load(self, site_id: str) -> np.ndarray:
        return self.images[self._row[site_id] % len(self.images)]


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--sizes", type=int, nargs="+", default=[32, 128, 512])
    p.add_argument("--per-shard", type=int, default=16)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--batches", type=int, default=24)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    a = p.parse_args(argv)
    if a.quick:
        a.sizes, a.per_shard, a.batch_size, a.batches, a.repeats = [4, 8], 2, 2, 2, 1
    torch.set_num_threads(1)
    rng = np.random.default_rng(0)
    images = [site_image(rng) for _ in range(8)]
    rows = []
    with tempfile.TemporaryDirectory(prefix="cellrep-bench-") as tmp:
        for n in a.sizes:
            out = Path(tmp) / f"s{n}"
            t0 = time.perf_counter()
            manifest = write_shards(ArraySource(n, images), out, samples_per_shard=a.per_shard, progress=False)
            write = n / (time.perf_counter() - t0)
            dm = CellDataModule(
                out,
                SPLIT,
                batch_size=a.batch_size,
                num_workers=1,
                crop_size=256,
                shuffle_buffer=min(SHUFFLE_BUFFER, n),
                augment_on_device=True,
            )
            warm = -(-min(SHUFFLE_BUFFER, n) // a.batch_size) + 2
            load = {
                w: median([rate(shard_loader(dm, w, finish=False), a.batches, warm) for _ in range(a.repeats)])
                for w in a.workers
            }
            rows.append([n, len(manifest["shards"]), write] + [load[w] for w in a.workers])
            print(f"# {n} sites done", flush=True)
    print(f"# machine: {machine()}")
    print(
        f"# writer: in-memory source, 1 process, {a.per_shard} sites/shard; loader: crop 256, batch "
        f"{a.batch_size}, {a.batches} timed batches, median of {a.repeats}"
    )
    print(
        table(
            ["sites", "shards", "writer samples/s"] + [f"loader uint8 samples/s, {w} worker(s)" for w in a.workers],
            rows,
        )
    )


if __name__ == "__main__":
    main()
