#!/usr/bin/env bash
# Train on an Apple-silicon GPU (MPS) with the MPS preset, resuming automatically. See --help.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/_start_common.sh"

USAGE="usage: [DATA_ROOT=dir] [DRY_RUN=1] scripts/start_mps_optimized_training.sh [train_gpt2.py flags ...]

Trains on Apple MPS with --preset mps (bf16 autocast on macOS 14+, else fp32; micro batch 8;
no compile) and --auto_resume: it continues from the newest checkpoint in --log_dir (default log/).
Ops that MPS lacks run on the CPU (PYTORCH_ENABLE_MPS_FALLBACK=1), and allocations stop at
the GPU's recommended working set (PYTORCH_MPS_HIGH_WATERMARK_RATIO=1.0) so an oversize batch
fails with a clear out-of-memory message instead of swapping; set either variable to override.
Without DATA_ROOT it runs the quickstart: tiny Shakespeare on a d6 model.
With DATA_ROOT it runs the GPT-2 recipe on those shards (GPT-2 124M; --model d6 or d12 is quicker).
Extra flags go to train_gpt2.py and win over the preset (python train_gpt2.py --help).

environment:
  DATA_ROOT   folder of <name>_train_NNNNNN.npy / <name>_val_NNNNNN.npy shards
              (default: data/tinyshakespeare, the quickstart's)
  DRY_RUN=1   print the command, run nothing
  PYTHON      the python to use (default: python)

example:
  scripts/start_mps_optimized_training.sh --micro_batch_size auto --mps_memory_fraction 0.8"
show_help_if_asked "$USAGE" "$@"

# torch reads this once, when it loads: export it before python starts.
export PYTORCH_ENABLE_MPS_FALLBACK="${PYTORCH_ENABLE_MPS_FALLBACK:-1}"

data_args=()
if [[ -n "${DATA_ROOT:-}" ]]; then
  require_shards "$DATA_ROOT" "python scripts/prepare_data.py --source text --input 'your/*.txt' --name NAME   (then DATA_ROOT=data/NAME)"
  data_args=(--data_root "$DATA_ROOT")
else
  require_shards data/tinyshakespeare "python scripts/prepare_data.py --source tinyshakespeare"
fi
run_command "$PYTHON" "$REPO_ROOT/train_gpt2.py" --device mps --preset mps "${data_args[@]}" --auto_resume "$@"
