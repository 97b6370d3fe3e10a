#!/usr/bin/env bash
# Data-scaling sweep: the same model trained on 1, 2, 4 and 8 experiments per cell type
# (synthetic screen; for a real dataset sweep the split's training fraction instead).
# Locally: `sweeps/data_scaling.sh` ; on SLURM add `hydra/launcher=slurm trainer=ddp ...`.
set -euo pipefail
exec cellrep-train -m data.synthetic.experiments_per_cell_type=2,4,8,16 \
  run_name=data_scaling "$@"
