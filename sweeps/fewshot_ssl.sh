#!/usr/bin/env bash
# The paper's de novo protocol (docs/FEWSHOT.md, "The paper's protocol: self-supervised pretraining, then
# few-shot"): 5 seeds × {no graph prior, graph prior} × {no context, context} × pretraining method, one
# cellrep-train run per arm (pretrain on 3 cell types, then linear probe + full fine-tune on k U2OS shots).
#
#   sweeps/fewshot_ssl.sh                          # k = 1: 60 runs
#   K="1 5" sweeps/fewshot_ssl.sh                  # k = 1 and k = 5: 120 runs
#   METHODS=mae SEEDS=0,1 sweeps/fewshot_ssl.sh    # fewer arms; extra arguments go to every run
#   K=5 CONTEXTS=null sweeps/fewshot_ssl.sh        # five shots, the no-context arm only
#   SHUFFLED_GRAPH=0 sweeps/fewshot_ssl.sh         # + the control: the graph prior on a graph whose genes trade
#                                                  #   names (task.graph_shuffle_seed=0), no context
#
# Per k and context arm one multirun, all of them at once, one thread each (tiny models train faster on one
# thread; two context arms fill two cores). They live in $CELLREP_ROOT/outputs/fewshot_ssl/${RUN_NAME}_k<k>/
# context_<null|synthetic>/ (logs next to them; re-running the same command resumes the runs). Seeds vary
# slowest, so a sweep cut short still has complete pairs. At the end, <...>_k<k>/summary.md covers both context
# arms: mean ± std per arm (linear probe and fine-tune top-1/5/10) and graph − none paired by seed.
set -euo pipefail
K=${K:-1}
METHODS=${METHODS:-mae,dino,simclr}
SEEDS=${SEEDS:-0,1,2,3,4}
SHUFFLED_GRAPH=${SHUFFLED_GRAPH:-}
CONTEXTS=${CONTEXTS-null synthetic}  # empty: no context arm (e.g. the shuffled-graph control alone)
RUN_NAME=${RUN_NAME:-fewshot_ssl}
root=${CELLREP_ROOT:-.}/outputs/fewshot_ssl
pids=()
for k in $K; do
  for context in $CONTEXTS; do
    dir=$root/${RUN_NAME}_k$k/context_$context
    mkdir -p "$dir"
    echo "k=$k, context=$context: $dir (log $dir.log)"
    OMP_NUM_THREADS=1 cellrep-train -m experiment=kg_ssl seed="$SEEDS" fewshot_method="$METHODS" \
      task.graph_loss=none,graph_contrastive model.context_path="$context" split.shots="$k" \
      run_name="${RUN_NAME}_k${k}_$context" hydra.sweep.dir="$dir" "$@" >"$dir.log" 2>&1 &
    pids+=($!)
  done
  if [[ -n $SHUFFLED_GRAPH ]]; then
    dir=$root/${RUN_NAME}_k$k/shuffled_graph_$SHUFFLED_GRAPH
    mkdir -p "$dir"
    echo "k=$k, shuffled-graph control: $dir (log $dir.log)"
    OMP_NUM_THREADS=1 cellrep-train -m experiment=kg_ssl seed="$SEEDS" fewshot_method="$METHODS" \
      task.graph_loss=graph_contrastive task.graph_shuffle_seed="$SHUFFLED_GRAPH" model.context_path=null \
      split.shots="$k" run_name="${RUN_NAME}_k${k}_shuffled" hydra.sweep.dir="$dir" "$@" >"$dir.log" 2>&1 &
    pids+=($!)
  fi
done
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=$?; done
for k in $K; do
  echo "== k=$k"
  python -m cellrep.cli.report "$root/${RUN_NAME}_k$k"
done
exit $status
