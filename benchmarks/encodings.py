"""Shard encodings: bytes per sample and decode samples/s per core, in one table.

Candidates for the ``<key>.<ext>`` member of a shard (all lossless, 6×512×512
uint8 sites): raw ``.npy`` (the current encoding), ``.npy`` + zlib (deflate)
at levels 1 and 6, a deflate-compressed multi-page TIFF (tifffile), and six
PNGs (PIL; what RxRx1 ships). zstd is not measured when neither
``zstandard`` nor ``imagecodecs`` is installed (cellrep does not depend on
them); the script says so. Decode is from memory, one process, alternating
between encodings ``--repeats`` times (medians). The training loader needs
the decode to keep up with the GPU; disk/network bytes matter only when I/O,
not CPU, is the bottleneck — the table shows both so the choice is explicit.

    python benchmarks/encodings.py [--quick]
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
from _common import machine, median, site_image, table  # noqa: E402
from PIL import Image  # noqa: E402


def _npy(img):
    buf = io.BytesIO()
    np.save(buf, img, allow_pickle=False)
    return buf.getvalue()


def _npy_load(data):
    return np.load(io.BytesIO(data), allow_pickle=False)


def _png(img):
    out = []
    for plane in img:
        buf = io.BytesIO()
        Image.fromarray(plane).save(buf, format="PNG", compress_level=6)
        out.append(buf.getvalue())
    return out


def _png_load(planes):
    return np.stack([np.asarray(Image.open(io.BytesIO(p))) for p in planes])


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
    c = {
        "npy (raw)": (_npy, _npy_load),
        "npy + zlib-1": (lambda i: zlib.compress(_npy(i), 1), lambda d: _npy_load(zlib.decompress(d))),
        "npy + zlib-6": (lambda i: zlib.compress(_npy(i), 6), lambda d: _npy_load(zlib.decompress(d))),
        "PNG ×6 (RxRx1)": (_png, _png_load),
    }
    try:
        _tiff_load(_tiff(np.zeros((2, 8, 8), np.uint8)))
        c["TIFF deflate"] = (_tiff, _tiff_load)
    except Exception as exc:  # noqa: BLE001 — optional codec
        print(f"# TIFF deflate skipped: {exc!r}")
    try:
        import zstandard

        c["npy + zstd-3"] = (
            lambda i: zstandard.ZstdCompressor(level=3).compress(_npy(i)),
            lambda d: _npy_load(zstandard.ZstdDecompressor().decompress(d)),
        )
    except ImportError:
        print("# npy + zstd skipped: `zstandard` is not installed")
    return c


def size(enc) -> int:
    return sum(map(len, enc)) if isinstance(enc, list) else len(enc)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--samples", type=int, default=16)
    p.add_argument("--seconds", type=float, default=1.5, help="decode time per encoding per repeat")
    p.add_argument("--repeats", type=int, default=3)
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
    base = median(rates["npy (raw)"])
    rows = []
    for name in enc:
        b = median([size(x) for x in enc[name]])
        rows.append(
            [name, f"{b / 1e6:.2f} MB", f"{b / raw:.2f}", median(rates[name]), f"{median(rates[name]) / base:.2f}"]
        )
    print(f"# machine: {machine()}")
    print(
        f"# {a.samples} synthetic 6×512×512 uint8 sites ({raw / 1e6:.2f} MB raw), decode from memory, "
        f"1 process, {a.repeats} repeats (medians)"
    )
    print(table(["encoding", "bytes/sample", "÷ raw", "decode samples/s per core", "÷ npy"], rows))


if __name__ == "__main__":
    main()
