#!/usr/bin/env bash
# Train GPT-2 on all GPUs of this machine (or of several) with torchrun, resuming and restarting by itself. See --help.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/_start_common.sh"

USAGE="usage: [NPROC_PER_NODE=n] [MAX_RESTARTS=n] [NNODES=n RDZV_ENDPOINT=host:port] [DATA_ROOT=dir] [DRY_RUN=1]
       scripts/start_multi_gpu_training.sh [torchrun options --] [train_gpt2.py flags ...]

Starts one process per GPU with torchrun (DDP over NCCL), --preset cuda and --auto_resume:
it continues from the newest checkpoint in --log_dir (default log/). When a rank dies, or hangs
for --hang_timeout (15 minutes on CUDA), torchrun stops the others and starts the group again, up
to MAX_RESTARTS times, and each new attempt resumes from the newest checkpoint (docs/FAILURES.md).
The token batch stays --total_batch_size (524,288 by the recipe); gradient accumulation shrinks
with the GPU count.
Several machines: run it on each with the same NNODES, RDZV_ENDPOINT and RDZV_ID (c10d
rendezvous: the machines find each other, and a restart on one restarts all), or with
NODE_RANK and MASTER_ADDR instead (static rendezvous: each machine's rank is pinned).
Options before a '--' go to torchrun (python -m torch.distributed.run --help); the other flags go
to train_gpt2.py and win over the preset (python train_gpt2.py --help).

environment:
  NPROC_PER_NODE  processes (GPUs) per machine (default: the GPUs torch sees, which
                  honours CUDA_VISIBLE_DEVICES)
  MAX_RESTARTS    how often torchrun starts the group again after a failure (default: 3; 0: never)
  NNODES          machines, or MIN:MAX for an elastic job (default: 1, a standalone run on this one)
  RDZV_ENDPOINT   host:port that every machine reaches, where the rendezvous store runs (several
                  machines; default: MASTER_ADDR:MASTER_PORT). Node rank 0, which writes the
                  checkpoints, is the machine whose host name sorts first
  RDZV_ID         the job's name, the same on every machine, new for each job (default:
                  \$SLURM_JOB_ID, else gpt2-train)
  NODE_RANK       instead of RDZV_ENDPOINT: this machine's index, 0 .. NNODES-1 (static rendezvous;
                  the machine with the checkpoints must be 0)
  MASTER_ADDR     the NODE_RANK 0 machine's address (static rendezvous), or RDZV_ENDPOINT's host
  MASTER_PORT     a free port there (default: 29500)
  DATA_ROOT       folder of <name>_train_NNNNNN.npy / <name>_val_NNNNNN.npy shards (default: data/edu_fineweb10B)
$RUN_ENV_HELP

examples:
  scripts/start_multi_gpu_training.sh
  MAX_RESTARTS=10 scripts/start_multi_gpu_training.sh --monitor-interval=1 -- --hang_timeout 600
  NNODES=2 RDZV_ENDPOINT=10.0.0.1:29500 RDZV_ID=run7 scripts/start_multi_gpu_training.sh   # on each machine
  NNODES=2 NODE_RANK=1 MASTER_ADDR=10.0.0.1 scripts/start_multi_gpu_training.sh          # pinned ranks
  sbatch scripts/slurm_train.sbatch                                                        # SLURM: docs/SCALING.md"
show_help_if_asked "$USAGE" "$@"

# Options up to a '--' are torchrun's; without one, every argument is train_gpt2.py's.
torchrun_options=()
for arg in "$@"; do
  if [[ "$arg" == "--" ]]; then
    while [[ "$1" != "--" ]]; do
      torchrun_options+=("$1")
      shift
    done
    shift
    break
  fi
done

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
MAX_RESTARTS="${MAX_RESTARTS:-3}"
if ! [[ "$MAX_RESTARTS" =~ ^[0-9]+$ ]]; then
  echo "error: MAX_RESTARTS='${MAX_RESTARTS}' is not a number of restarts (0 or more)" >&2
  exit 1
fi

NNODES="${NNODES:-1}"
if ! [[ "$NNODES" =~ ^[1-9][0-9]*(:[1-9][0-9]*)?$ ]]; then
  echo "error: NNODES='${NNODES}' is neither a number of machines nor MIN:MAX" >&2
  exit 1
fi
if [[ "$NNODES" == "1" ]]; then
  rendezvous=(--standalone)
elif [[ -z "${RDZV_ENDPOINT:-}" && -n "${NODE_RANK:-}" ]]; then
  if [[ -z "${MASTER_ADDR:-}" ]]; then
    echo "error: NODE_RANK=${NODE_RANK} needs MASTER_ADDR (the address of the NODE_RANK 0 machine), e.g." >&2
    echo "  NODE_RANK=${NODE_RANK} MASTER_ADDR=10.0.0.1 $0; or use RDZV_ENDPOINT=host:port instead" >&2
    exit 1
  fi
  rendezvous=(--nnodes="$NNODES" --node_rank="$NODE_RANK" --master_addr="$MASTER_ADDR" --master_port="${MASTER_PORT:-29500}")
else
  if [[ -z "${RDZV_ENDPOINT:-}" && -z "${MASTER_ADDR:-}" ]]; then
    echo "error: NNODES=${NNODES} needs RDZV_ENDPOINT=host:port (a machine every other one reaches, the same" >&2
    echo "  on all of them), e.g. RDZV_ENDPOINT=10.0.0.1:29500 RDZV_ID=run7 $0; or NODE_RANK and MASTER_ADDR" >&2
    exit 1
  fi
  RDZV_ENDPOINT="${RDZV_ENDPOINT:-${MASTER_ADDR}:${MASTER_PORT:-29500}}"
  RDZV_ID="${RDZV_ID:-${SLURM_JOB_ID:-gpt2-train}}"
  rendezvous=(--nnodes="$NNODES" --rdzv-backend=c10d --rdzv-endpoint="$RDZV_ENDPOINT" --rdzv-id="$RDZV_ID")
fi

DATA_ROOT="${DATA_ROOT:-data/edu_fineweb10B}"
check_data_root "python -m scripts.prepare_data --source fineweb-edu   (needs: pip install datasets; on every machine)"
# python -m torch.distributed.run is torchrun, run by this python. The options given win over these.
run_command "$PYTHON" -m torch.distributed.run "${rendezvous[@]}" --nproc_per_node="$NPROC_PER_NODE" \
  --max-restarts="$MAX_RESTARTS" ${torchrun_options[@]+"${torchrun_options[@]}"} \
  "$REPO_ROOT/train_gpt2.py" --device cuda --preset cuda --data_root "$DATA_ROOT" --auto_resume "$@"
