"""Shard sets in object storage: ``data.shards_dir=https://…`` (or ``s3://``, ``gs://``, any fsspec URL).

A remote shard set is read through a local mirror, ``<data.shards_cache>/<hash of the URL>/``:
when the data is opened, ``manifest.json``, ``index.parquet`` and every shard ``.tar`` the
mirror lacks are fetched (several at a time, with a progress bar), and the loaders then read
the mirror exactly as a local shard set (memory-mapped, by the index's byte offsets). Later
runs fetch only the manifest, to check that the remote set is still the one mirrored: a
rewritten set is refused rather than mixed. Every file lands under a temporary name and is
renamed into place, so ranks mirroring at once each end with the same complete files, and a
killed download leaves nothing that looks finished. The whole set is fetched, not shards on
demand: every rank's resampled training stream and every evaluation read all shards within
an epoch. ``http(s)://`` needs only fsspec and aiohttp (both come with Lightning); ``s3://``
needs ``s3fs`` and ``gs://`` ``gcsfs``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

from tqdm.auto import tqdm

from cellrep.errors import CellrepError
from cellrep.io import atomic_write_bytes

log = logging.getLogger(__name__)

FETCHERS = 8  # shards downloaded at once
_CHUNK = 8 << 20


def is_url(path) -> bool:
    return isinstance(path, str) and "://" in path and not path.startswith("file://")


def _open(url: str):
    import fsspec

    try:
        return fsspec.open(url, "rb").open()
    except ImportError as exc:  # fsspec names the package the protocol needs
        raise CellrepError(f"cannot read {url}: {exc}", fix="pip install the package named above") from None
    except (OSError, ValueError) as exc:  # aiohttp's ClientError is an OSError subclass for fsspec's http
        raise CellrepError(
            f"cannot read {url}: {type(exc).__name__}: {exc}",
            fix="check the URL (it must hold manifest.json, index.parquet and the .tar shards) and the network",
        ) from None


def _read(url: str) -> bytes:
    with _open(url) as f:
        return f.read()


def _download(url: str, dest: Path) -> None:
    """``url`` → ``dest``, through a temporary file in the same directory and a rename."""
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")
    try:
        with _open(url) as src, os.fdopen(fd, "wb") as out:
            shutil.copyfileobj(src, out, _CHUNK)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, dest)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def mirror(url: str, cache_dir: str | Path) -> Path:
    """The local mirror of the remote shard set at ``url``, complete: what it lacks is fetched first."""
    url = url.rstrip("/")
    local = Path(cache_dir).expanduser() / hashlib.sha256(url.encode()).hexdigest()[:16]
    local.mkdir(parents=True, exist_ok=True)
    manifest = _read(f"{url}/manifest.json")
    mine = local / "manifest.json"
    if mine.is_file() and mine.read_bytes() != manifest:
        raise CellrepError(
            f"the shard set at {url} changed since it was mirrored to {local}",
            fix=f"delete {local} to mirror the new shard set (or point data.shards_cache elsewhere)",
        )
    if not (local / "index.parquet").is_file():
        _download(f"{url}/index.parquet", local / "index.parquet")
    todo = [s["name"] for s in json.loads(manifest)["shards"] if not (local / s["name"]).is_file()]
    log.info("shards from %s: mirror %s lacks %d shard(s)", url, local, len(todo))
    with ThreadPoolExecutor(FETCHERS) as pool:  # network-bound: threads overlap the round trips
        jobs = [pool.submit(_download, f"{url}/{name}", local / name) for name in todo]
        for job in tqdm(as_completed(jobs), total=len(jobs), desc="fetching shards", unit="shard", disable=not todo):
            job.result()
    if not mine.is_file():
        atomic_write_bytes(mine, manifest)  # last: a mirror with a manifest is complete
    return local
