"""Pack any :class:`~cellrep.data.sources.base.ImageSource` into WebDataset tar shards.

Sources are read once (PNG/TIFF/JPEG 2000 decoding is the slow part), and
training streams the shards. Layout of a shards directory:

- ``<experiment>-p<plate>-<nnnn>.tar`` — samples of one plate, sorted by
  site_id, so a batch split is a list of shards. Members per sample: the
  source's C×H×W uint8 array, lossless, in ``data.encoding`` (``<key>.npy`` by
  default; :mod:`cellrep.data.shards.codecs`) and ``<key>.json``. A source whose
  channel files are already in the encoding's format (``encoded_channels``:
  RxRx3-core's JPEG 2000 for ``jp2``) has those bytes stored as they are.
- ``<shard>.stats.json`` — written right after its shard: exact integer pixel
  sums (so stats need no re-read on resume) and each image member's byte offset
  (so evaluation can read single samples without streaming whole shards).
- ``plan.json`` (written first: fingerprint + shard assignment, enables resume),
  ``index.parquet`` (one row per site, shard order) and ``manifest.json``
  (written last: its presence means the directory is complete).
- ``problems.json`` — the bad input met (see below), written when there was any.

Bad input is counted, not fatal one item at a time: a source lists what it
found wrong while indexing in ``source.problems`` (dicts ``kind``, ``item``,
``detail``: keys that do not parse, images without metadata, metadata rows
without images, wells missing a channel), and a ``load`` that raises
:class:`UnreadableSite` (a corrupt or undecodable file) is skipped, recorded in
the shard's sidecar (so a resumed run does not retry it) and counted. At the
end a summary names them all; above ``max_bad_fraction`` of the sites the run
fails with the list (and no manifest), so a rerun with a higher threshold only
rebuilds the index. Any other exception while reading stops the run: a
transient disk error must not silently drop data.

Every file goes to a temp name in the same directory, is fsynced and then
``os.replace``d, so a killed run never leaves a half-written file under a
final name.

The bad-input report and threshold live in :mod:`cellrep.data.shards.problems`,
the per-plate statistics in :mod:`cellrep.data.shards.plate_stats`.
"""

from __future__ import annotations

import glob
import hashlib
import io
import json
import logging
import math
import re
import tarfile
from concurrent.futures import FIRST_EXCEPTION, ProcessPoolExecutor, wait
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from cellrep.data.schema import validate_metadata
from cellrep.data.shards.codecs import Codec, codec, manifest_encoding, pack_channels
from cellrep.data.shards.plate_stats import add_sums, empty_sums, image_sums, manifest_stats, plate_key
from cellrep.data.shards.problems import PROBLEMS, bad_input_counts, bad_input_summary, check_bad_input
from cellrep.data.sources.base import UnreadableSite
from cellrep.errors import CellrepError
from cellrep.io import atomic_open

log = logging.getLogger(__name__)

__all__ = [
    "FORMAT_VERSION",
    "INDEX",
    "MANIFEST",
    "PLAN",
    "PROBLEMS",
    "UnreadableSite",
    "bad_input_summary",
    "load_manifest",
    "plan_shards",
    "plate_key",
    "read_index",
    "shard_key",
    "write_shards",
]

FORMAT_VERSION = 1
MANIFEST, INDEX, PLAN = "manifest.json", "index.parquet", "plan.json"
_SHARD_FIX = "run `cellrep-shard` with this data config (it resumes an interrupted run)"


def shard_key(site_id: str) -> str:
    """Tar member stem of a site: webdataset splits a member name at its first dot."""
    return str(site_id).replace(".", "_").replace("/", "_")


def _safe(name: str) -> str:
    safe = re.sub(r"[^A-Za-z0-9_-]", "_", name)
    # a changed name gets a hash so two experiments cannot map to one file name
    return safe if safe == name else f"{safe}-{hashlib.sha1(name.encode()).hexdigest()[:8]}"


def plan_shards(meta: pd.DataFrame, samples_per_shard: int) -> list[dict]:
    """Group sites by (experiment, plate), sort by site_id, cut into shards."""
    if samples_per_shard < 1:
        raise CellrepError(f"samples_per_shard={samples_per_shard}", fix="use a positive number")
    keys = meta["site_id"].astype(str).map(shard_key)
    if keys.duplicated().any():
        sid = meta.loc[keys.duplicated(keep=False), "site_id"].head(2).tolist()
        raise CellrepError(
            f"site_ids {sid} map to the same shard key (dots and slashes become '_')",
            fix="make site_ids differ in more than '.', '/' and '_'",
        )
    shards = []
    for (exp, plate), grp in meta.groupby(["experiment", "plate"], sort=True):
        ids = sorted(grp["site_id"].astype(str))
        for i in range(0, len(ids), samples_per_shard):
            name = f"{_safe(str(exp))}-p{int(plate)}-{i // samples_per_shard:04d}.tar"
            shards.append(
                {"name": name, "experiment": str(exp), "plate": int(plate), "site_ids": ids[i : i + samples_per_shard]}
            )
    return shards


# ---------------------------------------------------------------- json files
def _write_json(path: Path, obj, indent: int | None = 1) -> None:
    with atomic_open(path) as f:
        f.write(json.dumps(obj, indent=indent).encode())


def _read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


# ---------------------------------------------------------------- one shard
def _json_value(v):
    v = v.item() if isinstance(v, np.generic) else v
    return None if v is None or v is pd.NA or (isinstance(v, float) and math.isnan(v)) else v


def _check_image(img, site_id: str, shape: tuple | None) -> np.ndarray:
    ok = isinstance(img, np.ndarray) and img.dtype == np.uint8 and img.ndim == 3
    if ok and shape is not None and tuple(img.shape) != tuple(shape):
        ok = False
    if not ok:
        got = f"{img.dtype} {tuple(img.shape)}" if isinstance(img, np.ndarray) else type(img).__name__
        raise CellrepError(
            f"site {site_id}: image is {got}, expected uint8 C×H×W {tuple(shape) if shape else ''}",
            fix="the source's load() must return uint8 arrays of one shape with one channel per "
            "channel name (convert 16-bit images and resize in the reader)",
        )
    return np.ascontiguousarray(img)


def _stored_bytes(source, site_id: str, img: np.ndarray, image: Codec) -> tuple[bytes, bool]:
    """The image member, and whether it is the source's own files: kept as they are when the source has
    them in the codec's format (no decode and re-encode, docs/data.md "Shards"), else the pixels encoded.

    ``load`` decoded those same files into ``img`` (whose statistics the sidecar records), so the
    loader's decode of the kept bytes returns ``img``."""
    files = getattr(source, "encoded_channels", None)
    streams = files(site_id, image.keeps) if image.keeps and callable(files) else None
    if streams is None:
        return image.encode(img), False
    if len(streams) != img.shape[0] or not all(isinstance(b, bytes) for b in streams):
        raise CellrepError(
            f"{source.name}: encoded_channels({site_id!r}, {image.keeps!r}) gave {len(streams)} items, "
            f"the image has {img.shape[0]} channels",
            fix="the source's encoded_channels must return one bytes object per channel, in channel_names order",
        )
    return pack_channels(streams), True


def _write_shard(
    source, spec: dict, rows: list[dict], out_dir: Path, shape, fingerprint: str, bar=None, encoding: str = "npy"
) -> dict:
    """Write one shard and its stats sidecar; return the sidecar."""
    image = codec(encoding)
    path = out_dir / spec["name"]
    c = shape[0]
    stats = {"all": empty_sums(c), "controls": empty_sums(c)}
    offsets, skipped, kept = [], [], 0

    with atomic_open(path) as f, tarfile.open(fileobj=f, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for sid, row in zip(spec["site_ids"], rows):
            try:
                img = _check_image(source.load(sid), sid, shape)
                data, from_source = _stored_bytes(source, sid, img, image)
            except UnreadableSite as exc:  # bad input: counted and named at the end
                skipped.append({"kind": "unreadable_image", "item": sid, "detail": exc.problem})
                if bar is not None:
                    bar.update(1)
                continue
            except CellrepError:
                raise
            except Exception as exc:  # noqa: BLE001 — name the site, keep the cause
                raise CellrepError(
                    f"{source.name}: reading site {sid} failed: {type(exc).__name__}: {exc}",
                    fix="repair or remove that image; rerunning resumes from the finished shards",
                ) from exc
            kept += from_source
            key = shard_key(sid)
            meta = json.dumps({k: _json_value(v) for k, v in row.items()}).encode()
            for member, payload in ((f"{key}.{image.ext}", data), (f"{key}.json", meta)):
                info = tarfile.TarInfo(member)
                info.size, info.mtime, info.mode = len(payload), 0, 0o644
                tar.addfile(info, io.BytesIO(payload))
                if not member.endswith(".json"):  # the image's byte range; tar.offset: end of the padded data
                    offsets.append([tar.offset - 512 * -(-len(payload) // 512), len(payload)])
            s, sq = image_sums(img)
            one = {"sites": 1, "pixels": img.shape[1] * img.shape[2], "sum": s, "sumsq": sq}
            add_sums(stats["all"], one)
            if row["well_type"] == "negative_control":
                add_sums(stats["controls"], one)
            if bar is not None:
                bar.update(1)

    sidecar = {
        "format_version": FORMAT_VERSION,
        "fingerprint": fingerprint,
        "encoding": image.tag,
        "name": spec["name"],
        "sites_digest": _digest(spec["site_ids"]),
        "num_samples": len(offsets),
        "skipped": skipped,
        "size_bytes": path.stat().st_size,
        "offsets": offsets,
        **({"source_files_kept": kept} if image.keeps else {}),
        **stats,
    }
    _write_json(_sidecar_path(out_dir, spec["name"]), sidecar, indent=None)
    return sidecar


def _enc(encoding: str) -> list[str]:
    return [] if encoding == "npy" else [f"encoding:{codec(encoding).tag}"]


def _digest(site_ids: list[str]) -> str:
    return hashlib.sha256("\n".join(site_ids).encode()).hexdigest()


def _sidecar_path(out_dir: Path, name: str) -> Path:
    return out_dir / (name[: -len(".tar")] + ".stats.json")


def _finished_sidecar(out_dir: Path, spec: dict, fingerprint: str, encoding: str = "npy") -> dict | None:
    """The sidecar of a shard already written completely for this plan, else None."""
    path = out_dir / spec["name"]
    side = _read_json(_sidecar_path(out_dir, spec["name"]))
    if not side or not path.exists() or side.get("fingerprint") != fingerprint:
        return None
    if side.get("encoding", "npy") != codec(encoding).tag:  # sidecars older than the field are npy
        return None
    if side.get("sites_digest") != _digest(spec["site_ids"]) or side.get("size_bytes") != path.stat().st_size:
        return None
    try:
        with tarfile.open(path, mode="r:") as tar:
            n = sum(1 for m in tar.getmembers() if m.isreg())
    except (tarfile.TarError, OSError):
        return None
    return side if n == 2 * side.get("num_samples", -1) == 2 * len(side.get("offsets", ())) else None


_WORKER_SOURCE = None


def _init_worker(source) -> None:
    global _WORKER_SOURCE
    _WORKER_SOURCE = source


def _worker_task(spec, rows, out_dir, shape, fingerprint, encoding):
    return _write_shard(_WORKER_SOURCE, spec, rows, out_dir, shape, fingerprint, encoding=encoding)


# ---------------------------------------------------------------- public API
def _refuse_other_dataset(out_dir: Path, source, plan: list[dict]) -> None:
    for fname in (MANIFEST, PLAN):
        old = _read_json(out_dir / fname)
        if old and old.get("fingerprint") != source.fingerprint:
            raise CellrepError(
                f"{out_dir} already holds shards of dataset '{old.get('dataset')}' "
                f"(fingerprint {old.get('fingerprint')}); this is '{source.name}' (fingerprint {source.fingerprint})",
                fix="choose another shards directory (data.shards_dir=...) or delete that one",
            )
    if not (out_dir / PLAN).exists() and not (out_dir / MANIFEST).exists():
        clash = [s["name"] for s in plan if (out_dir / s["name"]).exists()]
        if clash:
            raise CellrepError(
                f"{out_dir} holds files named like shards ({clash[0]}) but no {PLAN}",
                fix="choose an empty shards directory",
            )


def _setup(source, out_dir: Path, samples_per_shard: int, encoding: str = "npy") -> dict:
    """What every writer (one process, a part, a merge) computes first: the same full plan."""
    codec(encoding)  # an unknown encoding or a missing library fails before anything is written
    meta = validate_metadata(source.metadata, source.name)
    plan = plan_shards(meta, samples_per_shard)
    out_dir.mkdir(parents=True, exist_ok=True)
    _refuse_other_dataset(out_dir, source, plan)
    problems = [dict(p) for p in getattr(source, "problems", ())]
    return {
        "meta": meta,
        "channel_names": [str(c) for c in source.channel_names],
        "plan": plan,
        # another encoding or stored layout is another plan (npy adds nothing: older shard sets stay up to date)
        "plan_digest": _digest([f"{s['name']}:{_digest(s['site_ids'])}" for s in plan] + _enc(encoding)),
        "encoding": encoding,
        "problems": problems,
        "total": len(meta) + len(problems),
    }


def _up_to_date(out_dir: Path, job: dict) -> dict | None:
    old = _read_json(out_dir / MANIFEST)
    if (
        old
        and old.get("plan_digest") == job["plan_digest"]
        and (out_dir / INDEX).exists()
        and all((out_dir / s["name"]).exists() for s in job["plan"])
    ):
        log.info("shards up to date: %s (%d samples)", out_dir, old["num_samples"])
        return old
    return None


def _shape(source, job: dict) -> tuple[int, ...]:
    shape = _probe_shape(source, job["plan"])
    if shape[0] != len(job["channel_names"]):
        raise CellrepError(
            f"{source.name}: images have {shape[0]} channels but the source names {len(job['channel_names'])} "
            f"({job['channel_names']})",
            fix="make the reader's channel_names match the images it returns",
        )
    return shape


def _write_specs(source, job, specs, out_dir, shape, num_workers, progress) -> dict[str, dict]:
    """Write the shards of ``specs`` that have no finished sidecar (resume); return all their sidecars."""
    enc = job["encoding"]
    sidecars = {s["name"]: side for s in specs if (side := _finished_sidecar(out_dir, s, source.fingerprint, enc))}
    if sidecars:
        log.info("resuming: %d of %d shards already written", len(sidecars), len(specs))
    todo = [s for s in specs if s["name"] not in sidecars]
    done = sum(side["num_samples"] + len(side.get("skipped", ())) for side in sidecars.values())
    total = sum(len(s["site_ids"]) for s in specs)
    with tqdm(total=total, initial=done, unit="site", desc=f"sharding {source.name}", disable=not progress) as bar:
        sidecars |= _write_missing(source, job["meta"], todo, out_dir, shape, num_workers, bar, enc)
    return sidecars


def write_shards(
    source,
    out_dir: Path,
    samples_per_shard: int = 256,
    num_workers: int = 0,
    progress: bool = True,
    max_bad_fraction: float = 0.01,
    encoding: str = "npy",
) -> dict:
    """Write ``source`` into ``out_dir`` as shards; resume or skip work already done.

    Returns the manifest. ``num_workers > 0`` writes shards in that many
    processes (byte-identical output: each shard is written by one function
    that depends only on the source). Bad input above ``max_bad_fraction`` of
    the sites raises :class:`CellrepError` with the list (see module docstring).
    A source may have ``describe()`` returning a JSON-able record of its reading
    rules; it is called before writing (so it may prepare state the worker
    processes inherit) and stored as ``manifest["source"]``.
    """
    out_dir = Path(out_dir)
    job = _setup(source, out_dir, samples_per_shard, encoding)
    if (old := _up_to_date(out_dir, job)) is not None:
        return old
    check_bad_input(job["problems"], job["total"], max_bad_fraction, source.name, out_dir, final=False)
    _start_plan(out_dir, source, job["plan"], samples_per_shard)
    source_info = source.describe() if callable(getattr(source, "describe", None)) else None
    shape = _shape(source, job)
    sidecars = _write_specs(source, job, job["plan"], out_dir, shape, num_workers, progress)
    return _finish(source, job, sidecars, out_dir, shape, source_info, max_bad_fraction)


def _finish(source, job, sidecars, out_dir, shape, source_info, max_bad_fraction) -> dict:
    """``index.parquet`` then ``manifest.json`` from the sidecars of every shard of the plan.

    A function of the plan and the sidecars only, so the merge of parts writes what one process
    writes, and two merges at once write the same bytes (each file atomically)."""
    plan, meta, total = job["plan"], job["meta"], job["total"]
    problems = job["problems"] + [p for s in plan for p in sidecars[s["name"]].get("skipped", ())]
    check_bad_input(problems, total, max_bad_fraction, source.name, out_dir, final=True)
    index = _build_index(meta, plan, sidecars)
    with atomic_open(out_dir / INDEX) as f:
        index.to_parquet(f, index=False)
    plate_stats, global_stats = manifest_stats(plan, sidecars, shape[0])
    shards = [
        {k: s[k] for k in ("name", "experiment", "plate")} | {"num_samples": sidecars[s["name"]]["num_samples"]}
        for s in plan
    ]
    manifest = {
        "format_version": FORMAT_VERSION,
        "dataset": source.name,
        "fingerprint": source.fingerprint,
        "channel_names": job["channel_names"],
        "image_shape": list(shape),
        "encoding": codec(job["encoding"]).tag,
        "num_samples": len(index),
        "shards": shards,
        "plan_digest": job["plan_digest"],
        "plate_stats": plate_stats,
        "global_stats": global_stats,
        "bad_input": bad_input_counts(problems, total),
    }
    if codec(job["encoding"]).keeps:  # how many sites hold the source's own files (the rest: re-encoded)
        manifest["source_files_kept"] = sum(sidecars[s["name"]].get("source_files_kept", 0) for s in plan)
    if source_info is not None:
        manifest["source"] = source_info
    _write_json(out_dir / MANIFEST, manifest)
    log.info("wrote %d samples in %d shards to %s", len(index), len(plan), out_dir)
    return manifest


def _probe_shape(source, plan: list[dict]) -> tuple[int, ...]:
    """Shape of the first readable site (unreadable ones are skipped here and counted later)."""
    for spec in plan:
        for sid in spec["site_ids"]:
            try:
                return tuple(int(x) for x in _check_image(source.load(sid), sid, None).shape)
            except UnreadableSite:
                continue
    raise CellrepError(f"{source.name}: no site could be read", fix="check data.root and the image files")


def _start_plan(out_dir: Path, source, plan: list[dict], samples_per_shard: int, own: list[dict] | None = None) -> None:
    """Mark the directory incomplete, drop leftovers of an earlier plan of this dataset, write the plan.

    ``own``: the shards of one part (:mod:`cellrep.data.shards.parts`); parts run at once, so each
    removes only its own shards' temp files. The plan file is the same bytes from every part."""
    (out_dir / MANIFEST).unlink(missing_ok=True)
    old_plan = _read_json(out_dir / PLAN) or {}
    for name in {s["name"] for s in old_plan.get("shards", [])} - {s["name"] for s in plan}:
        (out_dir / name).unlink(missing_ok=True)
        _sidecar_path(out_dir, name).unlink(missing_ok=True)
    # temp files of a killed run (atomic_open names them .<name>.<random>.tmp); all of them is safe for the
    # one writer cellrep.data.shards.prepare's lock admits, a part removes only those of its own shards
    if own is None:
        tmps = [*out_dir.glob(".*.tmp"), *out_dir.glob(".*.tmp.*")]
    else:
        stems = [s["name"] for s in own] + [_sidecar_path(out_dir, s["name"]).name for s in own]
        tmps = [t for stem in stems for t in out_dir.glob(f".{glob.escape(stem)}.*.tmp")]
    for tmp in tmps:
        tmp.unlink(missing_ok=True)
    _write_json(
        out_dir / PLAN,
        {
            "format_version": FORMAT_VERSION,
            "dataset": source.name,
            "fingerprint": source.fingerprint,
            "samples_per_shard": samples_per_shard,
            "shards": plan,
        },
        indent=None,
    )


def _write_missing(source, meta, todo, out_dir, shape, num_workers, bar, encoding="npy") -> dict[str, dict]:
    rows_by_site = meta.set_index("site_id", drop=False)

    def rows(spec):
        return rows_by_site.loc[spec["site_ids"]].to_dict("records")

    out = {}
    if num_workers <= 0 or not todo:
        for spec in todo:
            out[spec["name"]] = _write_shard(
                source, spec, rows(spec), out_dir, shape, source.fingerprint, bar, encoding
            )
        return out
    with ProcessPoolExecutor(num_workers, initializer=_init_worker, initargs=(source,)) as pool:
        args = (out_dir, shape, source.fingerprint, encoding)
        futs = {pool.submit(_worker_task, s, rows(s), *args): s for s in todo}
        pending = set(futs)
        while pending:
            finished, pending = wait(pending, return_when=FIRST_EXCEPTION)
            for fut in finished:
                if fut.exception() is not None:
                    for p in pending:  # finished shards stay: a rerun resumes from them
                        p.cancel()
                    raise fut.exception()
                out[futs[fut]["name"]] = fut.result()
                bar.update(len(futs[fut]["site_ids"]))
    return out


def _build_index(meta: pd.DataFrame, plan: list[dict], sidecars: dict[str, dict]) -> pd.DataFrame:
    order, shard, offset, size = [], [], [], []
    for spec in plan:
        skipped = {p["item"] for p in sidecars[spec["name"]].get("skipped", ())}
        written = [sid for sid in spec["site_ids"] if sid not in skipped]
        order += written
        shard += [spec["name"]] * len(written)
        offs = sidecars[spec["name"]]["offsets"]
        offset += [o for o, _ in offs]
        size += [n for _, n in offs]
    index = meta.set_index("site_id", drop=False).loc[order].reset_index(drop=True)
    index["shard"] = shard
    index["key"] = [shard_key(s) for s in order]
    index["npy_offset"] = np.asarray(offset, dtype=np.int64)
    index["npy_size"] = np.asarray(size, dtype=np.int64)
    return index


def load_manifest(shards_dir: Path) -> dict:
    """The manifest of a complete shards directory in an encoding this cellrep reads (CellrepError otherwise)."""
    shards_dir = Path(shards_dir)
    manifest = _read_json(shards_dir / MANIFEST)
    if manifest is None:
        state = "is incomplete (an interrupted run)" if (shards_dir / PLAN).exists() else "has no shards"
        raise CellrepError(f"{shards_dir} {state}: {MANIFEST} not found", fix=_SHARD_FIX)
    if manifest.get("format_version") != FORMAT_VERSION:
        raise CellrepError(
            f"{shards_dir}: shard format {manifest.get('format_version')} is not {FORMAT_VERSION}",
            fix="delete the directory and " + _SHARD_FIX,
        )
    missing = [s["name"] for s in manifest["shards"] if not (shards_dir / s["name"]).exists()]
    if missing or not (shards_dir / INDEX).exists():
        what = missing[0] if missing else INDEX
        raise CellrepError(f"{shards_dir}: {what} is missing ({len(missing)} shard(s) missing)", fix=_SHARD_FIX)
    manifest_encoding(manifest)  # an encoding this cellrep reads (a retired layout: the fix is to re-shard)
    return manifest


def read_index(shards_dir: Path) -> pd.DataFrame:
    """``index.parquet``: one row per site in shard order, with ``shard`` and ``key``."""
    path = Path(shards_dir) / INDEX
    if not path.exists():
        raise CellrepError(f"{shards_dir} has no {INDEX}", fix=_SHARD_FIX)
    return pd.read_parquet(path)
