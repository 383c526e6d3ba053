# Shared by scripts/start_*.sh (sourced, not run): --help, the data check, the dry run.
# shellcheck shell=bash

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-python}"
# The end of every script's --help.
RUN_ENV_HELP="  DRY_RUN=1       print the command, run nothing
  PYTHON          the python to use (default: python)"
# How to make shards from your own text, for the scripts whose default is the quickstart.
PREPARE_TEXT="python -m scripts.prepare_data --source text --input 'your/*.txt' --name NAME   (then DATA_ROOT=data/NAME)"

# show_help_if_asked USAGE ARGS...: print USAGE and exit 0 if -h or --help is among ARGS.
show_help_if_asked() {
  local usage="$1" arg
  shift
  for arg in "$@"; do
    if [[ "$arg" == "-h" || "$arg" == "--help" ]]; then
      printf '%s\n' "$usage"
      exit 0
    fi
  done
}

# require_shards DIR PREPARE_COMMAND: exit 1, naming the command that makes them, unless DIR
# holds train and val tokens in a format the loader reads (shards.py): <name>_<split>_NNNNNN.npy
# shards, nanoGPT's <split>.bin, or llm.c's <name>_<split>_NNNNNN.bin.
require_shards() {
  local root="$1" prepare="$2" split
  for split in train val; do
    if ! compgen -G "${root}/*_${split}_*.npy" > /dev/null && [[ ! -f "${root}/${split}.bin" ]] \
        && ! compgen -G "${root}/*_${split}*.bin" > /dev/null; then
      echo "error: no ${split} shards (*_${split}_*.npy, ${split}.bin or *_${split}_*.bin) in '${root}'." >&2
      echo "  make them:  ${prepare}" >&2
      echo "  or point DATA_ROOT at a folder of shards:  DATA_ROOT=path/to/shards $0" >&2
      exit 1
    fi
  done
}

# check_data_root PREPARE_COMMAND: require_shards "$DATA_ROOT" when it is set. Unset means the
# quickstart, whose tiny Shakespeare shards train_gpt2.py prepares itself on first use.
check_data_root() {
  if [[ -n "${DATA_ROOT:-}" ]]; then
    require_shards "$DATA_ROOT" "$1"
  fi
}

# run_command CMD...: print the command (quoted, ready to paste), then run it in place of this
# shell, unless DRY_RUN=1.
run_command() {
  echo "+$(printf ' %q' "$@")"
  if [[ "${DRY_RUN:-0}" == "1" ]]; then
    echo "DRY_RUN=1: not running it"
    exit 0
  fi
  exec "$@"
}
