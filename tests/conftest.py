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
# Triton kernels (triton_loss.py) run on CPU tensors through Triton's interpreter; it must be chosen
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
    import shards

    path = os.environ.get("TINYSHAKESPEARE_PATH")
    text = Path(path).read_text()[:120_000] if path and Path(path).is_file() else (
        "First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n\n" * 2000)
    tokens = [shards.EOT_TOKEN] + shards.get_tokenizer().encode_ordinary(text)
    split = int(len(tokens) * 0.9)
    root = tmp_path_factory.mktemp("tiny_data")
    shards.write_shard(shards.shard_path(root, "tiny", "train", 0), tokens[:split])
    shards.write_shard(shards.shard_path(root, "tiny", "val", 0), tokens[split:])
    return root


@pytest.fixture(scope="session")
def random_data(tmp_path_factory):
    """Train/val shards of random token ids (20,000 + 2,000): for runs where only the mechanics matter."""
    import numpy as np

    import shards

    root = tmp_path_factory.mktemp("random_data")
    rng = np.random.default_rng(0)
    shards.write_shard(shards.shard_path(root, "tiny", "train", 0), rng.integers(0, 50257, 20_000))
    shards.write_shard(shards.shard_path(root, "tiny", "val", 0), rng.integers(0, 50257, 2_000))
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


def run_main(main, argv):
    """A command line's exit status as the shell sees it: main(argv)'s return value, or its sys.exit code."""
    try:
        return main([str(a) for a in argv]) or 0
    except SystemExit as exc:
        return exc.code


def load_script(name):
    """scripts/<name> as a module, for tests that call its functions in this process."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(Path(name).stem, REPO_ROOT / "scripts" / name)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_ranks(script, *args, nproc=2, timeout=180):
    """Run tests/ranks/<script> under torchrun with nproc gloo ranks; returns CompletedProcess."""
    import subprocess

    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(
        [str(REPO_ROOT)] + ([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else [])))
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
                           str(REPO_ROOT / "tests" / "ranks" / script)] + [str(a) for a in args],
                          capture_output=True, text=True, timeout=timeout, env=env)


def read_metrics(log_dir):
    import json

    lines = (Path(log_dir) / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]
