"""Shard encodings: bytes per sample, decode samples/s per core, and cores per GPU, in one table.

The encodings ``data.encoding`` can write (``cellrep.data.shards.codecs.CODECS``: raw ``npy``, ``npy``
+ zstandard, one PNG per channel (what RxRx1 ships), one lossless JPEG 2000 per channel (what
RxRx3-core ships, and what ``jp2`` keeps of it: the cost of decoding its source bytes in the loader)),
then reference rows cellrep does not write: ``npy`` + zlib and a deflate TIFF. All are lossless, on
6×512×512 uint8 sites.
Decode is from memory, one process, alternating between encodings ``--repeats`` times (medians).
"cores per GPU" is the decode cores that feed one GPU training MAE ViT-L/8 at ``--gpu-images-per-s``
(default 569: its FLOP count at 40% MFU of an H100/H200, docs/PERFORMANCE.md; no GPU figure is
measured yet). For ``npy`` the loader does not decode at all (a sample is a view of the mapped
shard), so its cost per sample is the loader's crop copy (docs/PERFORMANCE.md, "Loader").

    python benchmarks/encodings.py [--quick] [--gpu-images-per-s 569]
"""

from __future__ import annotations

import argparse
import io
import sys
import time
import zlib
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import cellrep  # noqa: F401, E402  (torchvision compat before lightning/timm)

# isort: split
import numpy as np  # noqa: E402
from _common import CHANNELS, machine, median, site_image, table  # noqa: E402


def _npy(img):
    buf = io.BytesIO()
    np.save(buf, img, allow_pickle=False)
    return buf.getvalue()


def _npy_load(data):
    return np.load(io.BytesIO(data), allow_pickle=False)


def _tiff(img):
    import tifffile

    buf = io.BytesIO()
    tifffile.imwrite(buf, img, compression="zlib")
    return buf.getvalue()


def _tiff_load(data):
    import tifffile

    return tifffile.imread(io.BytesIO(data))


def codecs() -> dict:
    """name → (encode, decode); bytes of the encoded sample are len() or the sum of parts."""
    from cellrep.data.shards.codecs import CODECS

    shape = (CHANNELS, 512, 512)
    c = {}
    for name, codec in CODECS.items():  # what data.encoding writes, through the loader's own functions
        try:
            codec.encode(np.zeros((2, 8, 8), np.uint8))
        except Exception as exc:  # noqa: BLE001 — npy_zstd without zstandard, jp2 without OpenJPEG
            print(f"# {name} skipped: {exc}")
            continue
        c[f"data.encoding={name}"] = (codec.encode, lambda d, dec=codec.decode: dec(d, shape))
    c.update(
        {
            "npy + zlib-1": (lambda i: zlib.compress(_npy(i), 1), lambda d: _npy_load(zlib.decompress(d))),
            "npy + zlib-6": (lambda i: zlib.compress(_npy(i), 6), lambda d: _npy_load(zlib.decompress(d))),
        }
    )
    try:
        _tiff_load(_tiff(np.zeros((2, 8, 8), np.uint8)))
        c["TIFF deflate"] = (_tiff, _tiff_load)
    except Exception as exc:  # noqa: BLE001 — optional codec
        print(f"# TIFF deflate skipped: {exc!r}")
    return c


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--samples", type=int, default=16)
    p.add_argument("--seconds", type=float, default=1.5, help="decode time per encoding per repeat")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--gpu-images-per-s", type=float, default=569.0, help="one GPU's training rate to feed")
    p.add_argument(
        "--npy-loader-per-core", type=float, default=4890.0, help="loader samples/s per worker for npy (no decode)"
    )
    a = p.parse_args(argv)
    if a.quick:
        a.samples, a.seconds, a.repeats = 2, 0.05, 1
    rng = np.random.default_rng(0)
    images = [site_image(rng) for _ in range(a.samples)]
    raw = images[0].nbytes
    cs = codecs()
    enc = {name: [e(img) for img in images] for name, (e, _) in cs.items()}
    for name, (_, d) in cs.items():  # lossless?
        assert all(np.array_equal(d(x), img) for x, img in zip(enc[name], images)), name
    rates: dict[str, list[float]] = {name: [] for name in enc}
    for _ in range(a.repeats):
        for name, (_, dec) in cs.items():
            t0, n = time.perf_counter(), 0
            while time.perf_counter() - t0 < a.seconds:
                dec(enc[name][n % a.samples])
                n += 1
            rates[name].append(n / (time.perf_counter() - t0))
    base = median(rates["data.encoding=npy"])
    rows = []
    for name in enc:
        b, r = median([len(x) for x in enc[name]]), median(rates[name])
        # npy is never decoded by the loader (a view of the mapped shard): its per-core cost is the loader's
        per_core = a.npy_loader_per_core if name == "data.encoding=npy" else r
        rows.append(
            [name, f"{b / 1e6:.2f} MB", f"{b / raw:.2f}", r, f"{r / base:.3f}", f"{a.gpu_images_per_s / per_core:.2f}"]
        )
    print(f"# machine: {machine()}")
    print(
        f"# {a.samples} synthetic 6×512×512 uint8 sites ({raw / 1e6:.2f} MB raw), decode from memory, "
        f"1 process, {a.repeats} repeats (medians)"
    )
    print(
        f"# cores per GPU: {a.gpu_images_per_s:g} images/s ÷ per-core rate (npy: the loader's {a.npy_loader_per_core:g}/s)"
    )
    cols = ["encoding", "bytes/sample", "÷ raw", "decode samples/s per core", "÷ npy", "cores per GPU"]
    print(table(cols, rows))


if __name__ == "__main__":
    main()
