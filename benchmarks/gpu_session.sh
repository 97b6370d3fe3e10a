#!/usr/bin/env bash
# Every GPU check of a session that is lent a GPU, in one command (device time is short, and few full
# calls cost less than many small ones). Stages, in order (name some to run only those):
#   tests       the CUDA-only tests (pinned loader batches through the ring, the throughput script)
#   throughput  benchmarks/gpu_throughput.py: MAE ViT-L/8 and ResNet50, bf16, eager and compiled
#   loader      benchmarks/loader.py at 1, 4 and 16 workers (column (2): what a GPU run asks of the CPU)
#   train       cellrep-train trainer=gpu (bf16) on the synthetic screen, 2 epochs: flips/rot90 and
#               normalization on the GPU, pinned batches, perf/images_per_s
# Logs and JSON go to $OUT (the device tool's folder) or ./gpu_session_out; paste the tables into
# docs/PERFORMANCE.md. Without CUDA it says so and exits 0.
#
# On the lent machine hydra-core, omegaconf, webdataset and wandb are missing: carry them as wheels
# (../.library/device/README.md), then
#   python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
#   pip install -q -e . --no-deps && bash benchmarks/gpu_session.sh
set -uo pipefail
cd "$(dirname "$0")/.."
stages=${*:-tests throughput loader train}
if ! python3 -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "gpu_session: no CUDA device here, nothing to measure"
  exit 0
fi
out=${OUT:-gpu_session_out}
mkdir -p "$out"
nvidia-smi > "$out/nvidia-smi.txt" 2>&1
status=0
for stage in $stages; do
  echo "== $stage ($(date -u +%H:%M:%S) UTC)"
  case $stage in
    tests) python3 -m pytest -q -rs tests/data/test_batch_ring.py tests/models/test_vit_throughput_script.py ;;
    throughput) python3 benchmarks/gpu_throughput.py --json "$out/gpu_throughput.json" ;;
    loader) python3 benchmarks/loader.py --workers 1 4 16 --repeats 3 ;;
    train) CELLREP_ROOT=/tmp/cellrep-gpu-session cellrep-train trainer=gpu trainer.max_epochs=2 data.num_workers=8 \
             run_name=gpu_session ;;
    *) echo "unknown stage '$stage' (use: tests throughput loader train)"; false ;;
  esac 2>&1 | tee "$out/$stage.log"
  rc=${PIPESTATUS[0]}
  [ "$rc" -eq 0 ] || { echo "== $stage failed (exit $rc)"; status=1; }
done
exit $status
