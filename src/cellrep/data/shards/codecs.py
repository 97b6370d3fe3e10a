"""How a site's C×H×W uint8 array is stored in a shard (``data.encoding``; docs/data.md, "Shards").

One table, :data:`CODECS`: name → member extension, encode, decode. All are lossless:

- ``npy``: raw ``np.save`` bytes (the default). The loader decodes it as a zero-copy view of the mapped
  shard (``cellrep.data.loading.streams``), so it costs no CPU; the largest on disk.
- ``npy_zstd``: the ``npy`` bytes compressed with zstandard (level 3): smaller, decoding costs CPU.
- ``png``: one 8-bit grayscale PNG per channel (the files RxRx1 ships), PIL.
- ``jp2``: one lossless JPEG 2000 per channel (the files RxRx3-core ships), PIL with OpenJPEG. A source
  that already holds its channels in the codec's format (:attr:`Codec.keeps`, the source's
  ``encoded_channels``: RxRx3-core) has its bytes stored as they are, not decoded and re-encoded.

The per-channel encodings store one tar member per site, the C streams concatenated behind a table of
their lengths (:func:`pack_channels`), so every encoding is one byte range per sample in the index and
the loader reads them all the same way. The manifest records :attr:`Codec.tag`: shard sets written
before the field are ``npy``; ``png`` sets of the earlier stacked layout (tag ``png``: one (C·H)×W image)
are refused with the fix (re-shard). ``benchmarks/encodings.py`` measures bytes per sample and decode
speed (docs/PERFORMANCE.md, "Shard encoding").
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

from cellrep.errors import CellrepError

__all__ = ["CODECS", "Codec", "check_encoding", "codec", "manifest_encoding", "pack_channels"]

_ZSTD_LEVEL = 3  # zstandard's default: most of the size gain at a fraction of level 19's time
_CHANNELS_MAGIC = b"CRCH"  # "cellrep channels": a garbled or foreign member fails at its first 4 bytes
_RESHARD = "re-shard: run `cellrep-shard` with data.encoding=<one of {names}> (it rewrites the shards in place)"


@dataclass(frozen=True)
class Codec:
    ext: str  # tar member suffix after the key (webdataset splits a member name at its first dot)
    encode: Callable[[np.ndarray], bytes]
    decode: Callable[[bytes | memoryview, tuple], np.ndarray]  # (member bytes, C×H×W shape) → uint8 array
    tag: str  # what manifests, sidecars and plans record: changes when the stored layout does
    keeps: str | None = None  # a source's channel files in this format are stored as they are (pack_channels)


# ---------------------------------------------------------------- npy, npy_zstd
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


def _checked(arr: np.ndarray, shape: tuple) -> np.ndarray:
    if arr.dtype != np.uint8 or arr.shape != tuple(shape):
        raise ValueError(f"sample is {arr.dtype} {arr.shape}, the manifest says uint8 {tuple(shape)}")
    return arr


# ---------------------------------------------------------------- one image file per channel
def pack_channels(streams: Sequence[bytes]) -> bytes:
    """One member from C encoded channel files: magic, C, C little-endian uint32 lengths, the files."""
    table = np.array([len(streams), *map(len, streams)], dtype="<u4").tobytes()
    return _CHANNELS_MAGIC + table + b"".join(streams)


def _unpack_channels(data, channels: int) -> list[memoryview]:
    view = memoryview(data)
    head = len(_CHANNELS_MAGIC) + 4 * (channels + 1)
    if len(view) < head or view[: len(_CHANNELS_MAGIC)] != _CHANNELS_MAGIC:
        raise ValueError(f"sample is not {channels} packed channel images ({len(view)} bytes, no channel table)")
    n, *sizes = np.frombuffer(view, "<u4", channels + 1, len(_CHANNELS_MAGIC)).tolist()
    if n != channels or head + sum(sizes) != len(view):
        raise ValueError(
            f"sample holds {n} channel images in {len(view)} bytes, the manifest says {channels} "
            f"(lengths {sizes} after a {head}-byte table): truncated or garbled"
        )
    ends = np.cumsum([head, *sizes]).tolist()
    return [view[a:b] for a, b in zip(ends[:-1], ends[1:])]


def _plane_encoder(fmt: str, **options) -> Callable[[np.ndarray], bytes]:
    def encode(img: np.ndarray) -> bytes:
        from PIL import Image

        files = []
        for plane in img:
            buf = io.BytesIO()
            Image.fromarray(np.ascontiguousarray(plane), mode="L").save(buf, format=fmt, **options)
            files.append(buf.getvalue())
        return pack_channels(files)

    return encode


def _planes_decode(data, shape: tuple) -> np.ndarray:
    """C grayscale images (any format PIL opens: PNG, JPEG 2000) into one C×H×W uint8 array."""
    from PIL import Image

    out = np.empty(shape, np.uint8)
    for c, stream in enumerate(_unpack_channels(data, shape[0])):
        try:
            with Image.open(io.BytesIO(stream)) as im:
                mode, plane = im.mode, np.asarray(im)
        except Exception as exc:  # noqa: BLE001 — PIL raises OSError, SyntaxError, ValueError for bad files
            raise ValueError(f"channel {c + 1} does not decode: {type(exc).__name__}: {exc}") from None
        if mode != "L" or plane.shape != tuple(shape[1:]):
            raise ValueError(f"channel {c + 1} is a '{mode}' {plane.shape} image, the manifest says uint8 {shape[1:]}")
        out[c] = plane
    return out


def _jpeg2000() -> None:
    from PIL import features

    if not features.check("jpg_2000"):
        raise CellrepError(
            "data.encoding=jp2 needs a Pillow that can encode and decode JPEG 2000 (built with OpenJPEG)",
            fix="install Pillow's PyPI wheel, which bundles OpenJPEG (pip install --force-reinstall pillow), "
            "or use data.encoding=npy",
        )


CODECS: dict[str, Codec] = {
    "npy": Codec("npy", _npy_bytes, _npy_array, tag="npy"),
    "npy_zstd": Codec("npy.zst", _zstd_encode, _zstd_decode, tag="npy_zstd"),
    "png": Codec("pngs", _plane_encoder("PNG", compress_level=6), _planes_decode, tag="png_channels", keeps="png"),
    # irreversible=False: the reversible 5/3 wavelet, i.e. lossless (Pillow's default, written out)
    "jp2": Codec("jp2s", _plane_encoder("JPEG2000", irreversible=False), _planes_decode, tag="jp2", keeps="jp2"),
}
_BY_TAG = {c.tag: name for name, c in CODECS.items()}
# tags no longer written, with what they were: refused with the fix rather than decoded wrongly
_RETIRED = {"png": "one stacked (C·H)×W PNG per site, written by cellrep before png became one PNG per channel"}


def check_encoding(name: str) -> None:
    """Config check of ``data.encoding`` (known, and its library importable)."""
    if name not in CODECS:
        raise CellrepError(f"data.encoding={name!r} is not known", fix=f"use one of {sorted(CODECS)}")
    if name == "npy_zstd":
        _zstd()
    if name == "jp2":
        _jpeg2000()


def codec(name: str) -> Codec:
    check_encoding(name)
    return CODECS[name]


def manifest_encoding(manifest: dict) -> str:
    """The ``data.encoding`` a manifest's recorded tag is (checked); shard sets older than the field are ``npy``."""
    tag = str(manifest.get("encoding") or "npy")
    fix = _RESHARD.format(names=sorted(CODECS))
    if tag in _RETIRED:
        raise CellrepError(f"the shards' manifest records encoding {tag!r}: {_RETIRED[tag]}", fix=fix)
    if tag not in _BY_TAG:
        raise CellrepError(f"the shards' manifest records encoding {tag!r}, which this cellrep cannot read", fix=fix)
    check_encoding(_BY_TAG[tag])  # npy_zstd, jp2: the library is installed
    return _BY_TAG[tag]
