"""Sampling: scripts/sample.py is deterministic for a seed and fails clearly; training samples are seeded per rank."""
import importlib.util
import subprocess
import sys
from argparse import Namespace
from pathlib import Path

import pytest
import torch

import shards
from model import GPT, GPTConfig, sample_texts
from train_gpt2 import print_samples

REPO_ROOT = Path(__file__).resolve().parent.parent
CONFIG = dict(block_size=32, vocab_size=50304, n_layer=2, n_head=2, n_embd=64)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return GPT(GPTConfig(**CONFIG))  # untrained: near-uniform logits, so every draw of the generator shows


@pytest.fixture(scope="module")
def checkpoint_file(model, tmp_path_factory):
    path = tmp_path_factory.mktemp("sample") / "model_00000.pt"
    torch.save({"format_version": 1, "step": 0, "model": model.state_dict(), "model_config": CONFIG}, path)
    return path


def sample_cli(*args):
    return subprocess.run([sys.executable, "-m", "scripts.sample", *map(str, args)],
                          capture_output=True, text=True, timeout=120, cwd=REPO_ROOT)


def test_sample_script_is_deterministic_for_a_seed(checkpoint_file, model):
    common = ["--checkpoint", checkpoint_file, "--prompt", "ROMEO:", "--num_samples", 2, "--max_new_tokens", 12,
              "--device", "cpu", "--top_k", 20, "--temperature", 0.9]
    first, again, other = sample_cli(*common, "--seed", 7), sample_cli(*common, "--seed", 7), sample_cli(*common, "--seed", 8)
    for result in (first, again, other):
        assert result.returncode == 0, result.stderr
    assert first.stdout == again.stdout and first.stdout != other.stdout
    lines = first.stdout.splitlines()
    assert lines[0] == "--- sample 0 ---" and lines[1].startswith("ROMEO:") and "--- sample 1 ---" in lines
    # The script and the training loop sample through the same function.
    texts = sample_texts(model, shards.get_tokenizer(), "ROMEO:", 2, 12, torch.device("cpu"), "fp32",
                         temperature=0.9, top_k=20, seed=7)
    assert first.stdout == "".join(f"--- sample {i} ---\nROMEO:{text}\n" for i, text in enumerate(texts))


def load_script():
    spec = importlib.util.spec_from_file_location("sample_script", REPO_ROOT / "scripts" / "sample.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("args, message", [
    (["--checkpoint", "nope.pt"], "error: nope.pt does not exist"),
    (["--temperature", "0"], "--temperature must be above 0"),
    (["--top_k", "-1"], "--top_k must be 0 (no limit) or more"),
])
def test_sample_script_mistakes_are_one_message(checkpoint_file, capsys, args, message):
    with pytest.raises(SystemExit) as exit_info:  # any other exception would be a traceback for the user
        load_script().main(["--checkpoint", str(checkpoint_file), "--device", "cpu", *args])
    assert exit_info.value.code != 0
    out, err = capsys.readouterr()
    assert out == "" and message in err


def test_training_samples_are_seeded_per_rank_and_step(model, capsys):
    config = Namespace(prompt="\n", num_samples=1, max_new_tokens=10, seed=1337, dtype="fp32")
    enc = shards.get_tokenizer()
    model.train()
    outputs = {}
    for rank, step in ((0, 5), (1, 5), (0, 5), (0, 6)):
        print_samples(model, enc, config, torch.device("cpu"), step, rank)
        outputs.setdefault((rank, step), []).append(capsys.readouterr().out.split("-> ", 1)[1])
    assert model.training  # left as it was
    assert outputs[(0, 5)][0] == outputs[(0, 5)][1]  # a resumed run prints the same samples
    assert len({outputs[(0, 5)][0], outputs[(1, 5)][0], outputs[(0, 6)][0]}) == 3  # ranks and steps differ
