"""From a ``data`` config to ready shards: read the source, shard it once, reuse after."""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from cellrep.data.source import ImageSource
from cellrep.errors import CellrepError


def _expected_channels(data_cfg: DictConfig) -> list[str] | None:
    if data_cfg.channel_names is not None:
        return list(data_cfg.channel_names)
    if data_cfg.get("synthetic") is not None:
        return list(data_cfg.synthetic.channel_names)
    return None


def build_source(data_cfg: DictConfig, progress: bool = True) -> tuple[ImageSource, Path]:
    """The source reader and the shards directory it belongs to."""
    source_name = getattr(data_cfg.source, "name", data_cfg.source)
    channels = _expected_channels(data_cfg)
    expected = len(channels) if channels else None
    if data_cfg.root is None:
        raise CellrepError(f"data.root is not set for data={source_name}", fix="set data.root=/path/to/dataset")
    root = Path(data_cfg.root).expanduser()
    if source_name == "synthetic":
        from cellrep.data.rxrx1 import RxRx1Source
        from cellrep.data.synthetic import SyntheticScreenSpec, ensure_screen

        spec_fields = OmegaConf.to_container(data_cfg.synthetic, resolve=True)
        spec = SyntheticScreenSpec(**{k: tuple(v) if isinstance(v, list) else v for k, v in spec_fields.items()})
        screen_dir = ensure_screen(spec, root, progress=progress)
        source = RxRx1Source(screen_dir, channel_names=tuple(spec.channel_names), expected_channels=expected)
        default_shards = screen_dir / "shards"
    elif source_name == "rxrx1":
        from cellrep.data.rxrx1 import RxRx1Source

        if not root.is_dir():
            raise CellrepError(f"data root {root} does not exist",
                               fix="point data.root at the RxRx1 folder that holds metadata.csv and images/")
        kwargs = {"channel_names": tuple(channels)} if channels else {}
        source = RxRx1Source(root, expected_channels=expected, **kwargs)
        default_shards = root / "shards"
    elif source_name == "rxrx3_core":
        from cellrep.data.rxrx3_core import RxRx3CoreSource

        kwargs = {"channel_names": tuple(channels)} if channels else {}
        source = RxRx3CoreSource(root, expected_channels=expected, metadata=data_cfg.get("metadata"), **kwargs)
        default_shards = root / "shards"
    elif source_name == "tiff":
        from cellrep.data.tiff_plates import TiffPlateSource

        source = TiffPlateSource.from_config(root, data_cfg)
        default_shards = root / "shards"
    else:  # the config schema's enum makes this unreachable from the CLI
        raise CellrepError(f"unknown data source '{source_name}'",
                           fix="use data=synthetic, data=rxrx1, data=rxrx3_core or data=tiff")
    shards_dir = Path(data_cfg.shards_dir).expanduser() if data_cfg.shards_dir else default_shards
    return source, shards_dir


def ensure_shards(data_cfg: DictConfig, progress: bool = True) -> Path:
    """Shard the configured dataset unless identical shards exist; return their directory."""
    from cellrep.data.shards import write_shards

    source, shards_dir = build_source(data_cfg, progress=progress)
    write_shards(source, shards_dir, samples_per_shard=data_cfg.samples_per_shard,
                 num_workers=data_cfg.shard_workers, progress=progress,
                 max_bad_fraction=data_cfg.get("max_bad_fraction", 0.01))
    return shards_dir
