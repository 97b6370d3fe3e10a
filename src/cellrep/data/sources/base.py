"""What every dataset reader provides: canonical metadata and one image per site."""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import numpy as np
import pandas as pd

from cellrep.errors import CellrepError


@runtime_checkable
class ImageSource(Protocol):
    """A dataset in its own on-disk format (RxRx1, RxRx3-core, TIFF plates, ...).

    ``metadata`` has the canonical columns of :mod:`cellrep.data.schema` (validated
    with :func:`cellrep.data.schema.validate_metadata`), one row per site.
    ``load(site_id)`` returns that site's ``C×H×W`` uint8 array with channels
    in ``channel_names`` order. ``name`` identifies the dataset in manifests.
    ``fingerprint`` is a short string that changes when the source's content
    or reading rules change (used to refuse writing a different dataset over
    existing shards).

    Optional: ``encoded_channels(site_id, fmt) -> list[bytes] | None``, the site's channel files
    exactly as the dataset stores them (channel_names order) when they are in format ``fmt``
    (``"jp2"``, ``"png"``: :attr:`cellrep.data.shards.codecs.Codec.keeps`), else ``None``. The shard
    writer then stores those bytes instead of re-encoding ``load``'s pixels, so each must decode to
    exactly that channel of ``load``'s array: 8-bit grayscale, no conversion in between (RxRx3-core's
    JPEG 2000: ``cellrep.data.sources.rxrx3_core``).
    """

    name: str
    channel_names: tuple[str, ...]
    metadata: pd.DataFrame
    fingerprint: str

    def load(self, site_id: str) -> np.ndarray: ...


class UnreadableSite(CellrepError):
    """Raised by a source's ``load`` when the site's own data is bad (corrupt, truncated or
    undecodable file, channels of different sizes): the writer skips and counts the site."""
