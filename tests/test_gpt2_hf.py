"""GPT-2 weights to and from transformers: logits match both ways, the padded vocabulary never gets
probability, --init_from a saved folder trains from those weights, and the export loads in transformers.

The round trips need transformers (optional; CI does not install it): they are skipped without it,
with the reason in pytest's summary. The padding and error-message tests always run."""
import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.nn import functional as F

import gpt2_hf
from conftest import TINY_RUN, read_metrics, run_main, run_train
from cli import UserError
from model import GPT, GPTConfig
from run_config import resolve
from train_gpt2 import parse_args

GPT2_VOCAB_SIZE = GPTConfig.real_vocab_size  # 50257: the rows from here to 50304 are padding

REPO_ROOT = Path(__file__).resolve().parent.parent
SHAPELESS_RUN = TINY_RUN[2:] if TINY_RUN[:2] == ["--model", "d2"] else TINY_RUN  # --init_from sets the shape
needs_transformers = pytest.mark.skipif(
    importlib.util.find_spec("transformers") is None,
    reason="transformers is optional (pip install transformers) and not installed: GPT-2 weight conversion untested")


def test_padding_rows_of_the_vocabulary_never_get_probability():
    """OpenAI's weights get zero rows for tokens 50257-50303: logit 0, far above real tokens' logits
    here (as in GPT-2, whose logits are mostly large and negative). They must not count."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=16, n_layer=1, n_head=2, n_embd=32)).eval()
    with torch.no_grad():
        model.transformer.wte.weight.abs_()  # every real token's logit is negative below
        model.transformer.wte.weight[GPT2_VOCAB_SIZE:] = 0
        model.transformer.ln_f.weight.zero_()
        model.transformer.ln_f.bias.fill_(-10.0)
    idx = torch.randint(0, GPT2_VOCAB_SIZE, (2, 8))
    logits, _ = model(idx)
    assert torch.isneginf(logits[..., GPT2_VOCAB_SIZE:]).all() and logits[..., :GPT2_VOCAB_SIZE].max() < -1
    _, loss = model(idx[:, :-1].contiguous(), idx[:, 1:].contiguous())
    expected = F.cross_entropy(logits[:, :-1, :GPT2_VOCAB_SIZE].reshape(-1, GPT2_VOCAB_SIZE), idx[:, 1:].reshape(-1))
    torch.testing.assert_close(loss, expected)
    out = model.generate(idx[:, :2], 20, top_k=5, generator=torch.Generator().manual_seed(0))
    assert out.max() < GPT2_VOCAB_SIZE


def test_init_from_an_unknown_name_or_with_shape_flags_is_one_message():
    with pytest.raises(gpt2_hf.HFError, match=r"neither one of gpt2, gpt2-medium, gpt2-large, gpt2-xl nor a folder"):
        gpt2_hf.gpt_config("gpt3")
    for extra in (["--model", "d2"], ["--n_layer", "4"]):
        args = parse_args(["--init_from", "gpt2", "--device", "cpu"] + extra)
        with pytest.raises(UserError, match="--init_from takes the model shape from the weights"):
            resolve(args, "cpu")


def test_missing_transformers_names_the_install(tiny_data, tmp_path, monkeypatch, capsys):
    fake = tmp_path / "fake_site" / "transformers"  # an uninstalled transformers, even where it is installed
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ModuleNotFoundError(\"No module named 'transformers'\")\n")
    pythonpath = os.pathsep.join(filter(None, [str(fake.parent), os.environ.get("PYTHONPATH")]))
    result = run_train(SHAPELESS_RUN + ["--data_root", tiny_data, "--log_dir", tmp_path / "log", "--max_steps", 1,
                                        "--init_from", "gpt2"], cwd=tmp_path, env_extra={"PYTHONPATH": pythonpath})
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "error: " in result.stderr and "pip install transformers" in result.stderr
    monkeypatch.setitem(sys.modules, "transformers", None)
    assert run_main(gpt2_hf.main, ["export", tmp_path / "any.pt", "--out", tmp_path / "hf"]) == 1
    assert "pip install transformers" in capsys.readouterr().err


@pytest.fixture(scope="module")
def hf_model():
    import transformers

    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=2, n_head=2, n_embd=64, vocab_size=50257, n_positions=64)
    return transformers.GPT2LMHeadModel(config).eval()


def hf_logits(hf_model, idx):
    with torch.no_grad():
        return hf_model(idx).logits


@needs_transformers
def test_openai_layout_to_ours_gives_the_same_logits_and_loss(hf_model):
    model = gpt2_hf.from_hf(hf_model).eval()
    assert model.config.vocab_size == 50304 and model.config.block_size == 64
    assert model.transformer.wte.weight[GPT2_VOCAB_SIZE:].abs().sum() == 0  # zero padding rows
    idx = torch.randint(0, GPT2_VOCAB_SIZE, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits, _ = model(idx)
        _, loss = model(idx[:, :-1].contiguous(), idx[:, 1:].contiguous())
        hf_loss = hf_model(idx, labels=idx).loss  # transformers shifts the labels itself
    torch.testing.assert_close(logits[..., :GPT2_VOCAB_SIZE], hf_logits(hf_model, idx), atol=1e-5, rtol=0)
    torch.testing.assert_close(loss, hf_loss, atol=1e-5, rtol=0)


@needs_transformers
def test_ours_to_openai_layout_gives_the_same_logits():
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=64, n_layer=2, n_head=2, n_embd=64)).eval()
    hf = gpt2_hf.to_hf(model)
    assert hf.config.vocab_size == GPT2_VOCAB_SIZE and hf.config.n_positions == 64
    idx = torch.randint(0, GPT2_VOCAB_SIZE, (2, 40), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        logits, _ = model(idx)
    torch.testing.assert_close(hf_logits(hf, idx), logits[..., :GPT2_VOCAB_SIZE], atol=1e-5, rtol=0)
    # and back again: the same weights
    again = gpt2_hf.from_hf(hf)
    for name, tensor in model.state_dict().items():
        if name not in ("transformer.wte.weight", "lm_head.weight"):
            torch.testing.assert_close(again.state_dict()[name], tensor, atol=0, rtol=0)


@needs_transformers
def test_a_shorter_block_size_keeps_the_first_positions(hf_model, tmp_path):
    hf_model.save_pretrained(tmp_path / "hf")
    config = gpt2_hf.gpt_config(str(tmp_path / "hf"), block_size=32)
    assert config.block_size == 32 and gpt2_hf.gpt_config(str(tmp_path / "hf"), block_size=1024).block_size == 64
    model = gpt2_hf.from_pretrained(str(tmp_path / "hf"), config).eval()
    idx = torch.randint(0, GPT2_VOCAB_SIZE, (1, 32), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        logits, _ = model(idx)
    torch.testing.assert_close(logits[..., :GPT2_VOCAB_SIZE], hf_logits(hf_model, idx), atol=1e-5, rtol=0)


@needs_transformers
def test_init_from_a_saved_folder_trains_from_it_and_export_loads_in_transformers(hf_model, tiny_data, tmp_path):
    """--max_lr 0 keeps the weights, so the saved checkpoint must export back to the very same model,
    and the loss logged at step 0 must be the transformers model's loss on those batches."""
    import dataloader
    import transformers

    hf_model.save_pretrained(tmp_path / "hf")
    log_dir = tmp_path / "log"
    result = run_train(SHAPELESS_RUN + ["--data_root", tiny_data, "--log_dir", log_dir, "--init_from", tmp_path / "hf",
                                        "--total_batch_size", 256, "--max_steps", 1, "--max_lr", 0, "--warmup_steps", 1],
                       cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    # The configuration table says where the model came from.
    assert re.search(rf"^\s+model\s+{re.escape(str(tmp_path / 'hf'))}\s+init_from$", result.stdout, re.M)
    loader = dataloader.ShardedDataLoader(tiny_data, "train", 4, 32, 0, 1)
    with torch.no_grad():
        batch_losses = [F.cross_entropy(hf_model(x).logits.flatten(0, 1), y.flatten())
                        for x, y in (loader.next_batch() for _ in range(2))]  # 256 tokens = 2 micro batches of 4 x 32
    assert read_metrics(log_dir)[0]["loss"] == pytest.approx(float(sum(batch_losses) / 2), abs=1e-4)

    export = subprocess.run([sys.executable, str(REPO_ROOT / "gpt2_hf.py"), "export", str(log_dir / "model_00000.pt"),
                             "--out", str(tmp_path / "exported")], capture_output=True, text=True, timeout=120)
    assert export.returncode == 0, export.stderr
    exported = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "exported").eval()
    idx = torch.randint(0, GPT2_VOCAB_SIZE, (2, 40), generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(hf_logits(exported, idx), hf_logits(hf_model, idx), atol=1e-5, rtol=0)
