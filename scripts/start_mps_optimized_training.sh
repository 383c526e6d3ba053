#!/usr/bin/env bash
# Train on an Apple-silicon GPU (MPS) with the MPS preset, resuming automatically. See --help.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/_start_common.sh"

USAGE="usage: [DATA_ROOT=dir] [DRY_RUN=1] scripts/start_mps_optimized_training.sh [train_gpt2.py flags ...]

Trains on Apple MPS with --preset mps (what it sets: python device.py --device mps)
and --auto_resume: it continues from the newest checkpoint in --log_dir (default log/).
Ops that MPS lacks run on the CPU (PYTORCH_ENABLE_MPS_FALLBACK=1), and allocations stop at
the GPU's recommended working set (PYTORCH_MPS_HIGH_WATERMARK_RATIO=1.0) so an oversize batch
fails with a clear out-of-memory message instead of swapping; train_gpt2.py sets both unless
you set them. Without DATA_ROOT it runs the quickstart: tiny Shakespeare (prepared on first
use) on a d6 model. With DATA_ROOT it runs the GPT-2 recipe on those shards (GPT-2 124M;
--model d6 is quicker). Extra flags go to train_gpt2.py and win over the preset
(python train_gpt2.py --help).

environment:
  DATA_ROOT       folder of <name>_train_NNNNNN.npy / <name>_val_NNNNNN.npy shards
                  (default: none, the quickstart)
$RUN_ENV_HELP

example:
  scripts/start_mps_optimized_training.sh --micro_batch_size auto --mps_memory_fraction 0.8"
show_help_if_asked "$USAGE" "$@"

check_data_root "$PREPARE_TEXT"
run_command "$PYTHON" "$REPO_ROOT/train_gpt2.py" --device mps --preset mps ${DATA_ROOT:+--data_root "$DATA_ROOT"} \
  --auto_resume "$@"
