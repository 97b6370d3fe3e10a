"""cellrep-shard: read a dataset once in its own format and write WebDataset shards."""

from __future__ import annotations

import cellrep  # noqa: F401

# isort: split
import hydra
from omegaconf import DictConfig

from cellrep.cli.common import exit_on_user_error, register_resolvers
from cellrep.config import register_configs, to_schema
from cellrep.data.shards.prepare import ensure_shards, merge_shard_parts, shard_part
from cellrep.data.shards.writer import load_manifest

register_configs()
register_resolvers()


def shard(cfg: DictConfig) -> None:
    to_schema(cfg)
    if cfg.data.shard_merge:  # docs/data.md, "Sharding on a cluster"
        shards_dir, _ = merge_shard_parts(cfg.data)
    elif cfg.data.shard_part is not None:
        shards_dir, done = shard_part(cfg.data)
        if done["manifest"] is None:
            print(
                f"cellrep: part {done['part']} of {done['parts']} done ({done['shards']} shards) at {shards_dir}; "
                f"waiting for parts {done['unfinished']} (the last one merges, or run cellrep-shard "
                f"data.shard_merge=true data.shard_parts={done['parts']})"
            )
            return
    else:
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
