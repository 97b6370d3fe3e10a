"""How a site's C×H×W uint8 array is stored in a shard (``data.encoding``; docs/data.md, "Shards").

One table, :data:`CODECS`: name → member extension, encode, decode. All are lossless:

- ``npy``: raw ``np.save`` bytes (the default). The loader decodes it as a zero-copy view of the mapped
  shard (``cellrep.data.loading.streams``), so it costs no CPU; the largest on disk.
- ``npy_zstd``: the ``npy`` bytes compressed with zstandard (level 3): smaller, decoding costs CPU.
- ``png``: the C planes stacked into one (C·H)×W grayscale PNG (PIL): smallest for smooth images,
  slowest to decode.

The manifest records the encoding; shard sets written before it had the field are ``npy``.
``benchmarks/encodings.py`` measures bytes per sample and decode speed.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Callable

import numpy as np

from cellrep.errors import CellrepError

__all__ = ["CODECS", "Codec", "check_encoding", "codec", "manifest_encoding"]

_ZSTD_LEVEL = 3  # zstandard's default: most of the size gain at a fraction of level 19's time


@dataclass(frozen=True)
class Codec:
    ext: str  # tar member suffix after the key (webdataset splits a member name at its first dot)
    encode: Callable[[np.ndarray], bytes]
    decode: Callable[[bytes | memoryview, tuple], np.ndarray]  # (member bytes, C×H×W shape) → uint8 array


def _npy_bytes(img: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, img, allow_pickle=False)
    return buf.getvalue()


def _npy_array(data, shape: tuple) -> np.ndarray:
    return _checked(np.load(io.BytesIO(bytes(data)), allow_pickle=False), shape)


def _zstd():
    try:
        import zstandard
    except ImportError:
        raise CellrepError(
            "data.encoding=npy_zstd needs the zstandard package, which is not installed",
            fix="pip install zstandard (a cellrep dependency), or use data.encoding=npy or png",
        ) from None
    return zstandard


def _zstd_encode(img: np.ndarray) -> bytes:
    return _zstd().ZstdCompressor(level=_ZSTD_LEVEL).compress(_npy_bytes(img))


def _zstd_decode(data, shape: tuple) -> np.ndarray:
    # the frame records its content size (ZstdCompressor.compress writes it), so no size is guessed
    return _npy_array(_zstd().ZstdDecompressor().decompress(bytes(data)), shape)


def _png_encode(img: np.ndarray) -> bytes:
    from PIL import Image

    c, h, w = img.shape
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(img).reshape(c * h, w), mode="L").save(buf, format="PNG", compress_level=6)
    return buf.getvalue()


def _png_decode(data, shape: tuple) -> np.ndarray:
    from PIL import Image

    with Image.open(io.BytesIO(bytes(data))) as im:
        arr = np.asarray(im)
    c, h, w = shape
    if arr.dtype != np.uint8 or arr.shape != (c * h, w):
        raise ValueError(f"png sample is {arr.dtype} {arr.shape}, the manifest says uint8 {(c * h, w)}")
    return arr.reshape(shape)


def _checked(arr: np.ndarray, shape: tuple) -> np.ndarray:
    if arr.dtype != np.uint8 or arr.shape != tuple(shape):
        raise ValueError(f"sample is {arr.dtype} {arr.shape}, the manifest says uint8 {tuple(shape)}")
    return arr


CODECS: dict[str, Codec] = {
    "npy": Codec("npy", _npy_bytes, _npy_array),
    "npy_zstd": Codec("npy.zst", _zstd_encode, _zstd_decode),
    "png": Codec("png", _png_encode, _png_decode),
}


def check_encoding(name: str) -> None:
    """Config check of ``data.encoding`` (known, and its library importable)."""
    if name not in CODECS:
        raise CellrepError(f"data.encoding={name!r} is not known", fix=f"use one of {sorted(CODECS)}")
    if name == "npy_zstd":
        _zstd()


def codec(name: str) -> Codec:
    check_encoding(name)
    return CODECS[name]


def manifest_encoding(manifest: dict) -> str:
    """The encoding a manifest records (checked); shard sets older than the field are ``npy``."""
    name = str(manifest.get("encoding") or "npy")
    if name not in CODECS:
        raise CellrepError(
            f"the shards' manifest records encoding {name!r}, which this cellrep cannot read",
            fix=f"re-shard with data.encoding=<one of {sorted(CODECS)}> into another data.shards_dir",
        )
    check_encoding(name)  # npy_zstd: the library is installed
    return name
