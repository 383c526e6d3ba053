"""Shared test set-up: run from any directory, and offline.

CI and the developers' machines have no internet, so the tests point tiktoken and
tiny Shakespeare at the local copies in ../shared when they exist. Users' machines
download both instead (see README).
"""
import os
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
SHARED = REPO_ROOT.parent / "shared"
sys.path.insert(0, str(REPO_ROOT))

if "TIKTOKEN_CACHE_DIR" not in os.environ and (SHARED / "tiktoken_cache").is_dir():
    os.environ["TIKTOKEN_CACHE_DIR"] = str(SHARED / "tiktoken_cache")
if "TINYSHAKESPEARE_PATH" not in os.environ and (SHARED / "data" / "tinyshakespeare.txt").is_file():
    os.environ["TINYSHAKESPEARE_PATH"] = str(SHARED / "data" / "tinyshakespeare.txt")
# Triton kernels (kernels.py) run on CPU tensors through Triton's interpreter; it must be chosen
# before triton is first imported, which torch.compile may do.
os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture
def tinyshakespeare_path():
    path = os.environ.get("TINYSHAKESPEARE_PATH")
    if not path or not Path(path).is_file():
        pytest.skip("tiny Shakespeare is not on disk and the tests do not download it")
    return Path(path)


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
    """Train/val shards of real GPT-2 tokens (the start of tiny Shakespeare), small enough for
    CPU tests. Falls back to a short public-domain-style text when the corpus is not on disk."""
    import dataloader

    path = os.environ.get("TINYSHAKESPEARE_PATH")
    text = Path(path).read_text()[:120_000] if path and Path(path).is_file() else (
        "First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n\n" * 2000)
    tokens = [dataloader.EOT_TOKEN] + dataloader.get_tokenizer().encode_ordinary(text)
    split = int(len(tokens) * 0.9)
    root = tmp_path_factory.mktemp("tiny_data")
    dataloader.write_shard(dataloader.shard_path(root, "tiny", "train", 0), tokens[:split])
    dataloader.write_shard(dataloader.shard_path(root, "tiny", "val", 0), tokens[split:])
    return root


# A 2-layer, 128-wide GPT on 32-token sequences: a step takes tens of milliseconds on a CPU.
TINY_RUN = ["--model", "d2", "--seq_len", "32", "--micro_batch_size", "4", "--device", "cpu",
            "--eval_steps", "2", "--max_new_tokens", "8", "--num_samples", "1"]


def run_train(args, cwd, timeout=300, env_extra=None, torchrun_procs=None):
    """Run train_gpt2.py in a subprocess (it installs signal handlers); returns CompletedProcess."""
    import subprocess

    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", **(env_extra or {}))
    prefix = [sys.executable]
    if torchrun_procs:
        prefix += ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={torchrun_procs}"]
    return subprocess.run(prefix + [str(REPO_ROOT / "train_gpt2.py")] + [str(a) for a in args],
                          cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def read_metrics(log_dir):
    import json

    lines = (Path(log_dir) / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]
