#!/usr/bin/env bash
# Train on the CPU with the CPU preset, resuming automatically. See --help.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/_start_common.sh"

USAGE="usage: [DATA_ROOT=dir] [DRY_RUN=1] scripts/start_cpu_training.sh [train_gpt2.py flags ...]

Trains on the CPU with --preset cpu (what it sets: python device.py --device cpu)
and --auto_resume: it continues from the newest checkpoint in --log_dir (default log/).
Without DATA_ROOT it runs the quickstart: tiny Shakespeare (prepared on first use) on a d4
model sized for a CPU. With DATA_ROOT it runs the GPT-2 recipe on those shards: add a small
--model (d4, d6). Extra flags go to train_gpt2.py and win over the preset (python train_gpt2.py --help).

environment:
  DATA_ROOT       folder of <name>_train_NNNNNN.npy / <name>_val_NNNNNN.npy shards
                  (default: none, the quickstart)
$RUN_ENV_HELP

example:
  scripts/start_cpu_training.sh --max_steps 100 --num_threads 4"
show_help_if_asked "$USAGE" "$@"

check_data_root "$PREPARE_TEXT"
run_command "$PYTHON" "$REPO_ROOT/train_gpt2.py" --device cpu --preset cpu ${DATA_ROOT:+--data_root "$DATA_ROOT"} \
  --auto_resume "$@"
