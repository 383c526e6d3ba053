#!/usr/bin/env bash
# Train GPT-2 on all GPUs of this machine (or of several) with torchrun, resuming automatically. See --help.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/_start_common.sh"

USAGE="usage: [NPROC_PER_NODE=n] [DATA_ROOT=dir] [DRY_RUN=1] scripts/start_multi_gpu_training.sh [train_gpt2.py flags ...]

Starts one process per GPU with torchrun (DDP over NCCL), --preset cuda and --auto_resume:
it continues from the newest checkpoint in --log_dir (default log/). The token batch stays
--total_batch_size (524,288 by the recipe); gradient accumulation shrinks with the GPU count.
Several machines: run it on each with the same NNODES, MASTER_ADDR and MASTER_PORT and its own NODE_RANK.
Extra flags go to train_gpt2.py and win over the preset (python train_gpt2.py --help).

environment:
  NPROC_PER_NODE  processes (GPUs) per machine (default: the GPUs torch sees, which
                  honours CUDA_VISIBLE_DEVICES)
  NNODES          machines (default: 1, a standalone run on this one)
  NODE_RANK       this machine's index, 0 .. NNODES-1 (needed when NNODES > 1)
  MASTER_ADDR     address of the machine with NODE_RANK 0 (needed when NNODES > 1)
  MASTER_PORT     a free port there (default: 29500)
  DATA_ROOT       folder of <name>_train_NNNNNN.npy / <name>_val_NNNNNN.npy shards (default: data/edu_fineweb10B)
$RUN_ENV_HELP

examples:
  scripts/start_multi_gpu_training.sh
  NNODES=2 NODE_RANK=0 MASTER_ADDR=10.0.0.1 scripts/start_multi_gpu_training.sh    # on the first machine
  NNODES=2 NODE_RANK=1 MASTER_ADDR=10.0.0.1 scripts/start_multi_gpu_training.sh    # on the second"
show_help_if_asked "$USAGE" "$@"

if [[ -z "${NPROC_PER_NODE:-}" ]]; then
  # torch's count is the one train_gpt2.py checks each LOCAL_RANK against, CUDA_VISIBLE_DEVICES applied.
  NPROC_PER_NODE="$("$PYTHON" -c "import torch; print(torch.cuda.device_count())" 2> /dev/null || echo 0)"
  if [[ "$NPROC_PER_NODE" -lt 1 ]]; then
    echo "error: torch sees no GPU (CUDA_VISIBLE_DEVICES='${CUDA_VISIBLE_DEVICES-unset}'); check nvidia-smi," >&2
    echo "  set NPROC_PER_NODE=N, or train on the CPU with scripts/start_cpu_training.sh" >&2
    exit 1
  fi
  echo "NPROC_PER_NODE=${NPROC_PER_NODE}: GPUs torch sees on this machine"
fi
if ! [[ "$NPROC_PER_NODE" =~ ^[1-9][0-9]*$ ]]; then
  echo "error: NPROC_PER_NODE='${NPROC_PER_NODE}' is not a positive number of processes" >&2
  exit 1
fi

NNODES="${NNODES:-1}"
if [[ "$NNODES" == "1" ]]; then
  rendezvous=(--standalone)
else
  if [[ -z "${NODE_RANK:-}" || -z "${MASTER_ADDR:-}" ]]; then
    echo "error: NNODES=${NNODES} needs NODE_RANK (0 .. $((NNODES - 1)), this machine's index) and MASTER_ADDR" >&2
    echo "  (the address of the NODE_RANK 0 machine), e.g. NODE_RANK=0 MASTER_ADDR=10.0.0.1 $0" >&2
    exit 1
  fi
  rendezvous=(--nnodes="$NNODES" --node_rank="$NODE_RANK" --master_addr="$MASTER_ADDR" --master_port="${MASTER_PORT:-29500}")
fi

DATA_ROOT="${DATA_ROOT:-data/edu_fineweb10B}"
check_data_root "python -m scripts.prepare_data --source fineweb-edu   (needs: pip install datasets; on every machine)"
# python -m torch.distributed.run is torchrun, run by this python.
run_command "$PYTHON" -m torch.distributed.run "${rendezvous[@]}" --nproc_per_node="$NPROC_PER_NODE" \
  "$REPO_ROOT/train_gpt2.py" --device cuda --preset cuda --data_root "$DATA_ROOT" --auto_resume "$@"
