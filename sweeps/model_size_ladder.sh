#!/usr/bin/env bash
# Model-size ladder: MAE pretraining of ViT-S/16 → B/16 → L/16 → L/8 at fixed data and
# steps, one SLURM job per size with DDP inside (8 GPUs per node). Extra args pass through,
# e.g. `sweeps/model_size_ladder.sh data=rxrx1 data.root=/data/rxrx1 hydra.launcher.partition=gpu`.
# Re-running the same command resumes every size from its last checkpoint (run_name).
set -euo pipefail
exec cellrep-train -m experiment=mae_vit_l8 model=vit_s16,vit_b16,vit_l16,vit_l8 \
  hydra/launcher=slurm trainer=ddp trainer.devices=8 trainer.num_nodes=1 \
  run_name=mae_size_ladder "$@"
