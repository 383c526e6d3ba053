#!/usr/bin/env bash
# Train GPT-2 on one NVIDIA GPU with the CUDA preset, resuming automatically. See --help.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/_start_common.sh"

USAGE="usage: [DATA_ROOT=dir] [DRY_RUN=1] scripts/start_cuda_optimized_training.sh [train_gpt2.py flags ...]

Trains on one CUDA GPU with --preset cuda (what it sets: python device.py --device cuda)
and --auto_resume: it continues from the newest checkpoint in --log_dir (default log/).
The recipe is GPT-2 124M on FineWeb-Edu (524,288 tokens per step, 19,073 steps).
For several GPUs use scripts/start_multi_gpu_training.sh.
Extra flags go to train_gpt2.py and win over the preset (python train_gpt2.py --help).

environment:
  DATA_ROOT       folder of <name>_train_NNNNNN.npy / <name>_val_NNNNNN.npy shards (default: data/edu_fineweb10B)
$RUN_ENV_HELP

example:
  DATA_ROOT=data/edu_fineweb10B scripts/start_cuda_optimized_training.sh --compile max-autotune"
show_help_if_asked "$USAGE" "$@"

DATA_ROOT="${DATA_ROOT:-data/edu_fineweb10B}"
check_data_root "python -m scripts.prepare_data --source fineweb-edu   (needs: pip install datasets)"
run_command "$PYTHON" "$REPO_ROOT/train_gpt2.py" --device cuda --preset cuda --data_root "$DATA_ROOT" --auto_resume "$@"
