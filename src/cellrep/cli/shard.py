"""cellrep-shard: read a dataset once in its own format and write WebDataset shards."""

from __future__ import annotations

import cellrep  # noqa: F401

# isort: split
import hydra
from omegaconf import DictConfig

from cellrep.cli.common import exit_on_user_error, register_resolvers
from cellrep.config import register_configs, to_schema
from cellrep.data.shards.prepare import ensure_shards
from cellrep.data.shards.writer import load_manifest

register_configs()
register_resolvers()


def shard(cfg: DictConfig) -> None:
    to_schema(cfg)
    shards_dir = ensure_shards(cfg.data).shards_dir
    manifest = load_manifest(shards_dir)
    print(
        f"cellrep: {manifest['num_samples']} sites of '{manifest['dataset']}' in {len(manifest['shards'])} shards "
        f"({', '.join(manifest['channel_names'])}) at {shards_dir}"
    )


@hydra.main(version_base="1.3", config_path="../conf", config_name="shard")
def main(cfg: DictConfig) -> None:
    exit_on_user_error(shard, cfg)


if __name__ == "__main__":
    main()
