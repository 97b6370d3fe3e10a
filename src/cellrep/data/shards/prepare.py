"""From a ``data`` config to ready shards: read the source, shard it once, reuse after.

Several processes may ask for the same data at once (sweep points of a Hydra
multirun, DDP ranks, two users of one cache). Generating and sharding then
run under an inter-process lock (``fcntl.flock`` on a lock file beside the
cache; (docs/architecture.md) a multirun is one job per sweep point, and they share the
data cache): the first process does the work, the others wait and then find
the cache complete and reuse it. The
kernel releases the lock when its holder exits, so a killed run leaves no
stale lock behind.

The parts of a cluster run (``data.shard_part``, :func:`shard_part`) are meant to run at once, on
a shared filesystem whose locks may not work: they take no shards lock (each writes only its own
files, see :mod:`cellrep.data.shards.parts`). Only the synthetic screen is still generated under its
lock, released before the part writes anything.
"""

from __future__ import annotations

import fcntl
import logging
import os
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from omegaconf import DictConfig, OmegaConf

from cellrep.data.shards.remote import is_url, mirror
from cellrep.data.sources.base import ImageSource
from cellrep.errors import CellrepError

log = logging.getLogger(__name__)
SOURCES = ("synthetic", "rxrx1", "rxrx3_core", "tiff")  # the readers of build_source


@contextmanager
def cache_lock(path: Path, what: str, progress: bool = True) -> Iterator[None]:
    """Hold an exclusive lock on ``path`` (created if needed, never deleted) across processes.

    Blocks while another process holds it, saying so once. Not re-entrant: a second
    ``cache_lock`` of the same file in one process waits for the first (flock locks
    belong to the open file), so nothing here takes a lock it may already hold.
    """
    path = Path(path).expanduser().absolute()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            msg = f"waiting for another process preparing {what} (lock {path})"
            if progress:
                print(msg, flush=True)
            else:
                log.info(msg)
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing the only descriptor releases the lock


def _synthetic_spec(data_cfg: DictConfig):
    from cellrep.data.sources.synthetic import SyntheticScreenSpec

    spec_fields = OmegaConf.to_container(data_cfg.synthetic, resolve=True)
    return SyntheticScreenSpec(**{k: tuple(v) if isinstance(v, list) else v for k, v in spec_fields.items()})


def _source_name(data_cfg: DictConfig) -> str:
    return str(data_cfg.source)


def screen_lock_path(data_cfg: DictConfig) -> Path:
    """``<root>/.<fingerprint>.lock``, beside the synthetic screen's cache ``<root>/<fingerprint>``."""
    from cellrep.data.sources.synthetic import spec_fingerprint

    return Path(data_cfg.root).expanduser() / f".{spec_fingerprint(_synthetic_spec(data_cfg))}.lock"


def shards_lock_path(shards_dir: Path) -> Path:
    """``<parent>/.<name>.lock`` beside a shards directory."""
    return Path(shards_dir).parent / f".{Path(shards_dir).name}.lock"


def _expected_channels(data_cfg: DictConfig) -> list[str] | None:
    if data_cfg.channel_names is not None:
        return list(data_cfg.channel_names)
    if data_cfg.get("synthetic") is not None:
        return list(data_cfg.synthetic.channel_names)
    return None


@dataclass(frozen=True)
class PreparedShards:
    """What ``ensure_shards`` made ready: the shards, and the folder of the dataset they came from."""

    shards_dir: Path
    dataset_root: Path | None  # the source's own folder (the synthetic screen's holds compound_targets.csv)


def _screen_lock(data_cfg: DictConfig, progress: bool) -> AbstractContextManager[None]:
    """The synthetic screen's lock, or nothing for a real source (its files are read, never written here)."""
    if _source_name(data_cfg) != "synthetic" or data_cfg.root is None:
        return nullcontext()
    return cache_lock(
        screen_lock_path(data_cfg), f"the synthetic screen under {Path(data_cfg.root).expanduser()}", progress
    )


def build_source(data_cfg: DictConfig, progress: bool = True) -> tuple[ImageSource, Path]:
    """The source reader and the shards directory it belongs to (a synthetic screen is generated if needed)."""
    with _screen_lock(data_cfg, progress):
        return _open_source(data_cfg, progress)


def _open_source(data_cfg: DictConfig, progress: bool) -> tuple[ImageSource, Path]:
    """``build_source`` without the lock: the caller holds the synthetic screen's lock."""
    source_name = _source_name(data_cfg)
    channels = _expected_channels(data_cfg)
    expected = len(channels) if channels else None
    if data_cfg.root is None:
        raise CellrepError(f"data.root is not set for data={source_name}", fix="set data.root=/path/to/dataset")
    root = Path(data_cfg.root).expanduser()
    if source_name == "synthetic":
        from cellrep.data.sources.rxrx1 import RxRx1Source
        from cellrep.data.sources.synthetic import ensure_screen

        spec = _synthetic_spec(data_cfg)
        screen_dir = ensure_screen(spec, root, progress=progress)
        source = RxRx1Source(screen_dir, channel_names=tuple(spec.channel_names), expected_channels=expected)
        default_shards = screen_dir / "shards"
    elif source_name == "rxrx1":
        from cellrep.data.sources.rxrx1 import RxRx1Source

        if not root.is_dir():
            raise CellrepError(
                f"data root {root} does not exist",
                fix="point data.root at the RxRx1 folder that holds metadata.csv and images/",
            )
        kwargs = {"channel_names": tuple(channels)} if channels else {}
        source = RxRx1Source(root, expected_channels=expected, **kwargs)
        default_shards = root / "shards"
    elif source_name == "rxrx3_core":
        from cellrep.data.sources.rxrx3_core import RxRx3CoreSource

        kwargs = {"channel_names": tuple(channels)} if channels else {}
        source = RxRx3CoreSource(root, expected_channels=expected, metadata=data_cfg.get("metadata"), **kwargs)
        default_shards = root / "shards"
    elif source_name == "tiff":
        from cellrep.data.sources.tiff_plates import TiffPlateSource

        source = TiffPlateSource.from_config(root, data_cfg, progress=progress)
        default_shards = root / "shards"
    else:  # cellrep.config checks data.source against SOURCES: unreachable from the CLI
        raise CellrepError(f"unknown data source '{source_name}'", fix=f"use data=<one of {list(SOURCES)}>")
    shards_dir = Path(data_cfg.shards_dir).expanduser() if data_cfg.shards_dir else default_shards
    return source, shards_dir


def ensure_shards(data_cfg: DictConfig, progress: bool = True) -> PreparedShards:
    """Shard the configured dataset unless identical shards exist; return them and the dataset's folder.

    A second process asking for the same data meanwhile waits, then reuses it: the synthetic
    screen is generated and sharded under its screen's lock, and any source is sharded under
    the lock of its shards directory (always taken in that order, so two never deadlock).
    Real sources are opened (and checked) before locking: a wrong data.root creates nothing.
    The source is opened once: callers needing its folder take ``dataset_root``."""
    from cellrep.data.shards.writer import write_shards

    if is_url(data_cfg.get("shards_dir")):  # a finished shard set in object storage: read through a local mirror
        return PreparedShards(mirror(data_cfg.shards_dir, data_cfg.shards_cache), None)
    if data_cfg.get("shard_part") is not None or data_cfg.get("shard_merge"):
        raise CellrepError(
            "data.shard_part / data.shard_merge write or merge one part of the shards, which only cellrep-shard does",
            fix="shard first (cellrep-shard data.shard_part=... or data.shard_merge=true), then run "
            "without data.shard_part and data.shard_merge",
        )
    with _screen_lock(data_cfg, progress):
        source, shards_dir = _open_source(data_cfg, progress)
        with cache_lock(shards_lock_path(shards_dir), f"the shards at {shards_dir}", progress):
            write_shards(
                source,
                shards_dir,
                samples_per_shard=data_cfg.samples_per_shard,
                num_workers=data_cfg.shard_workers,
                progress=progress,
                max_bad_fraction=data_cfg.get("max_bad_fraction", 0.01),
                encoding=data_cfg.get("encoding", "npy"),
            )
    return PreparedShards(shards_dir, getattr(source, "root", None))


def shard_part(data_cfg: DictConfig, progress: bool = True) -> tuple[Path, dict]:
    """``data.shard_part`` of ``data.shard_parts`` without the shards lock; the last part merges.

    Returns the shards directory and :func:`~cellrep.data.shards.parts.write_part`'s record."""
    from cellrep.data.shards.parts import write_part

    source, shards_dir = build_source(data_cfg, progress)  # the screen's lock only while opening
    done = write_part(
        source,
        shards_dir,
        int(data_cfg.shard_part),
        int(data_cfg.shard_parts),
        samples_per_shard=data_cfg.samples_per_shard,
        num_workers=data_cfg.shard_workers,
        progress=progress,
        max_bad_fraction=data_cfg.get("max_bad_fraction", 0.01),
        encoding=data_cfg.get("encoding", "npy"),
    )
    return shards_dir, done


def merge_shard_parts(data_cfg: DictConfig, progress: bool = True) -> tuple[Path, dict]:
    """``data.shard_merge=true``: index and manifest of the finished parts (their names if not all are)."""
    from cellrep.data.shards.parts import merge_parts

    source, shards_dir = build_source(data_cfg, progress)
    manifest = merge_parts(
        source,
        shards_dir,
        int(data_cfg.shard_parts),
        samples_per_shard=data_cfg.samples_per_shard,
        max_bad_fraction=data_cfg.get("max_bad_fraction", 0.01),
        encoding=data_cfg.get("encoding", "npy"),
    )
    return shards_dir, manifest
