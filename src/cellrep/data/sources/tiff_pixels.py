"""Pixels of TIFF sites: decoding TIFF files into planes and mapping 16-bit planes to uint8.

Owns the pure functions under :class:`~cellrep.data.sources.tiff_plates.TiffPlateSource`
(which owns the metadata, the layouts and the file paths): :func:`read_tiff` and
:func:`raw_planes` turn a site's files into its 2-D 8/16-bit planes (a file that
does not decode raises :class:`~cellrep.data.sources.base.UnreadableSite`, skipped and
counted by the shard writer); :func:`percentile_levels` computes one plate's
``percentile`` levels from a sample of its sites (module-level, so worker
processes can run it); :func:`to_uint8` applies a ``bit_depth_rule`` (``RULES``;
described in :mod:`cellrep.data.sources.tiff_plates`) to one plane.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from cellrep.data.sources.base import UnreadableSite

RULES = ("percentile", "max", "shift")


def read_tiff(path: Path) -> np.ndarray:
    """All planes of a TIFF: 2-D, pages stacked (P×H×W), or one page with samples.
    Pillow takes over for codecs tifffile needs imagecodecs for (LZW, PackBits)."""
    import tifffile

    try:
        with tifffile.TiffFile(path) as tif:
            pages = list(tif.pages)
            return np.stack([p.asarray() for p in pages]) if len(pages) > 1 else pages[0].asarray()
    except (KeyError, ValueError) as exc:  # tifffile's message names imagecodecs
        if "imagecodecs" not in str(exc):
            raise
    from PIL import Image, ImageSequence

    with Image.open(path) as image:
        planes = [np.asarray(frame) for frame in ImageSequence.Iterator(image)]
    return planes[0] if len(planes) == 1 else np.stack(planes)


def raw_planes(files: tuple[Path, ...], channel_names: tuple[str, ...]) -> list[np.ndarray]:
    """The 2-D planes of one site (8- or 16-bit), from one file per channel or one multi-page file.
    Anything wrong with the files' content raises :class:`UnreadableSite`."""
    planes = []
    n = len(channel_names)
    for path in files:
        try:
            arr = read_tiff(path)
        except Exception as exc:  # noqa: BLE001 — any decoding failure is this file's fault
            raise UnreadableSite(f"{path} cannot be read: {type(exc).__name__}: {exc}") from None
        if arr.ndim == 3 and len(files) == 1 and arr.shape[-1] == n and arr.shape[0] != n:
            arr = np.moveaxis(arr, -1, 0)  # one page with contiguous samples (H×W×C)
        planes += [arr] if arr.ndim == 2 else list(arr)
    if channel_names and len(planes) != n:
        raise UnreadableSite(f"{files[0]} has {len(planes)} plane(s), expected {n} channels")
    for k, p in enumerate(planes):
        path = files[min(k, len(files) - 1)]
        if p.dtype not in (np.uint8, np.uint16) or p.ndim != 2 or p.shape != planes[0].shape:
            raise UnreadableSite(f"{path}: plane {p.dtype} {p.shape}; need 8/16-bit grayscale of one size")
    return planes


def percentile_levels(sites: list[tuple[Path, ...]], channel_names: tuple[str, ...], percentile) -> list:
    """``(low, high)`` per channel: ``percentile`` of the 16-bit pixels of ``sites`` (one plate's sample);
    ``None`` for a channel without 16-bit data. Unreadable sites are left out (the writer counts them)."""
    values = [[] for _ in channel_names]
    for files in sites:
        try:
            planes = raw_planes(files, channel_names)
        except UnreadableSite:
            continue
        for c, p in enumerate(planes):
            if p.dtype != np.uint8:  # ~2^18 pixels per site are plenty for a percentile
                values[c].append(p.ravel()[:: max(p.size >> 18, 1)])
    return [tuple(float(x) for x in np.percentile(np.concatenate(v), percentile)) if v else None for v in values]


def to_uint8(plane: np.ndarray, rule: str, levels=None, max_value: int = 65535, shift: int = 8) -> np.ndarray:
    """One channel to uint8: 8-bit passes, 16-bit by ``rule`` (``levels`` = (low, high) for percentile)."""
    if plane.dtype == np.uint8:
        return plane
    if rule == "shift":
        return np.minimum(plane >> shift, 255).astype(np.uint8)
    lo, hi = (0.0, float(max_value)) if rule == "max" or levels is None else levels
    scale = np.float32(255.0 / max(hi - lo, 1e-6))
    return np.clip(np.rint((plane.astype(np.float32) - np.float32(lo)) * scale), 0, 255).astype(np.uint8)
