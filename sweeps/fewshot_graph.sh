#!/usr/bin/env bash
# De novo cell line protocol (docs/FEWSHOT.md, docs/FEWSHOT.md): 5 seeds × {no graph loss, graph loss} × k ∈ {1, 5}
# shots per perturbation of the held-out cell type; prints and writes <sweep dir>/summary.md (mean ± std).
# Locally: `sweeps/fewshot_graph.sh` ; on SLURM add `hydra/launcher=slurm`.
set -euo pipefail
exec cellrep-train -m experiment=kg_fewshot seed=0,1,2,3,4 task.graph_loss=none,graph_contrastive split.shots=1,5 \
  "$@"
