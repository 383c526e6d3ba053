"""The trainer as users run it: losses, DDP equivalence, and one clear message per mistake."""
import json
import math
from types import SimpleNamespace

import pytest
import torch

from conftest import TINY_RUN, read_metrics, run_ranks, run_train
from model import GPT, GPTConfig, MODEL_PRESETS
import train_gpt2
from train_gpt2 import get_lr, parse_args


def tiny_model():
    torch.manual_seed(0)
    return GPT(GPTConfig(block_size=64, **MODEL_PRESETS["d2"]))


def test_loss_at_init_is_close_to_uniform():
    # With GPT-2 init the logits start near zero: the loss is that of a uniform guess.
    model = tiny_model()
    idx, targets = torch.randint(0, 50257, (2, 4, 32))  # targets independent of the inputs
    _, loss = model(idx, targets)
    assert abs(loss.item() - math.log(model.config.vocab_size)) < 0.1


def test_gpt2_parameter_names_and_tied_embeddings():
    model = tiny_model()
    names = set(model.state_dict())
    for name in ("transformer.wte.weight", "transformer.wpe.weight", "transformer.h.0.attn.c_attn.weight",
                 "transformer.h.0.attn.c_proj.weight", "transformer.h.1.mlp.c_fc.weight", "transformer.ln_f.weight",
                 "lm_head.weight"):
        assert name in names
    assert model.lm_head.weight.data_ptr() == model.transformer.wte.weight.data_ptr()
    # residual projections start smaller than the rest (GPT-2's 1/sqrt(2 * n_layer) scaling)
    assert model.transformer.h[0].attn.c_proj.weight.std() < 0.8 * model.transformer.h[0].attn.c_attn.weight.std()


def test_gpt2_124m_has_124m_parameters():
    with torch.device("meta"):
        model = GPT(GPTConfig(**MODEL_PRESETS["gpt2"], vocab_size=50257))
    assert sum(p.numel() for p in model.parameters()) == 124_439_808  # OpenAI's GPT-2 small


def test_weight_decay_only_on_matrices():
    opt = tiny_model().configure_optimizer(0.1, 1e-3)
    decayed, plain = opt.param_groups
    assert decayed["weight_decay"] == 0.1 and all(p.dim() == 2 for p in decayed["params"])
    assert plain["weight_decay"] == 0.0 and all(p.dim() == 1 for p in plain["params"])


def test_lr_schedule_warms_up_then_decays_to_min():
    config = SimpleNamespace(max_lr=1e-3, min_lr=1e-4, warmup_steps=10, max_steps=100)
    assert get_lr(0, config) == pytest.approx(1e-4)
    assert get_lr(9, config) == pytest.approx(1e-3)
    assert get_lr(55, config) == pytest.approx(5.5e-4)
    assert get_lr(100, config) == pytest.approx(1e-4)


def test_short_run_lowers_the_loss_and_logs_jsonl(tiny_data, tmp_path):
    result = run_train(TINY_RUN + ["--data_root", tiny_data, "--log_dir", tmp_path, "--total_batch_size", 256,
                                   "--max_steps", 40, "--warmup_steps", 5, "--max_lr", 3e-3, "--eval_interval", 20],
                       cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    records = read_metrics(tmp_path)
    steps = [r for r in records if "loss" in r]
    assert [r["step"] for r in steps] == list(range(40))
    for key in ("step", "loss", "lr", "norm", "dt_ms", "tok_per_sec"):
        assert key in steps[0]
    first, last = sum(r["loss"] for r in steps[:3]) / 3, sum(r["loss"] for r in steps[-3:]) / 3
    assert last < first - 2.0, (first, last)
    vals = [r["val_loss"] for r in records if "val_loss" in r]
    assert len(vals) == 3 and vals[-1] < vals[0]
    assert "sample 0 at step 39" in result.stdout


def test_ddp_two_ranks_match_one_process(tiny_data, tmp_path):
    # Same total batch: 1 process accumulates 2 micro batches, 2 ranks take one each.
    common = TINY_RUN + ["--data_root", tiny_data, "--total_batch_size", 256, "--max_steps", 6,
                         "--warmup_steps", 2, "--max_lr", 1e-3, "--eval_interval", 3]
    single = run_train(common + ["--log_dir", tmp_path / "single"], cwd=tmp_path)
    assert single.returncode == 0, single.stderr
    ddp = run_train(common + ["--log_dir", tmp_path / "ddp"], cwd=tmp_path, torchrun_procs=2)
    assert ddp.returncode == 0, ddp.stderr
    assert "grad_accum_steps     2" in single.stdout and "grad_accum_steps     1" in ddp.stdout
    one, two = read_metrics(tmp_path / "single"), read_metrics(tmp_path / "ddp")
    assert [r["step"] for r in one] == [r["step"] for r in two]
    for a, b in zip(one, two):
        key = "loss" if "loss" in a else "val_loss"
        assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-5), (a, b)
    assert ddp.stdout.count("effective configuration") == 1  # only rank 0 prints


@pytest.mark.parametrize("extra, message", [
    (["--total_batch_size", 1000], "is not a multiple of micro_batch_size * seq_len * world_size"),
    (["--seq_len", 2048], "longer than the model's block size 1024"),
    (["--n_embd", 129], "not divisible by --n_head"),
    (["--device", "cuda"], "no CUDA GPU is visible"),
    (["--ddp_bucket_cap_mb", 0], "--ddp_bucket_cap_mb 0.0 cannot work: use PyTorch's 25"),
    (["--max_lr", -1], "--max_lr -1.0 cannot work: use a finite learning rate, 0 or more"),
    (["--max_lr", "nan"], "--max_lr nan cannot work"),
    (["--min_lr", -1], "--min_lr -1.0 cannot work"),
    (["--min_lr", 1], "--min_lr 1.0 is above --max_lr"),
    (["--warmup_steps", -5], "--warmup_steps -5 cannot work: use 0 (no warm-up) or more"),
    (["--total_batch_size", 0], "--total_batch_size 0 cannot work"),
    (["--grad_clip", -1], "--grad_clip -1.0 cannot work: use 0 (no clipping)"),
    (["--weight_decay", -0.5], "--weight_decay -0.5 cannot work"),
    (["--checkpoint_interval", -1], "--checkpoint_interval -1 cannot work"),
    (["--keep_last_n_checkpoints", -2], "--keep_last_n_checkpoints -2 cannot work: use -1 (keep all) or 1 or more"),
    (["--eval_steps", -1], "--eval_steps -1 cannot work"),
    (["--seq_len", 0], "--seq_len 0 cannot work"),
    (["--n_layer", 0], "--n_layer 0 cannot work"),
    (["--max_steps", -1], "--max_steps -1 cannot work: use at least 1"),
    (["--hang_timeout", -1], "--hang_timeout -1.0 cannot work: use 0 (off) or a number of seconds, e.g. 900"),
    (["--checkpoint_every_minutes", "nan"], "--checkpoint_every_minutes nan cannot work: use 0 (off) or a number of minutes, e.g. 30"),
    (["--resume"], "--resume needs --checkpoint_path"),
])
def test_user_mistakes_get_one_clear_message_and_write_nothing(tiny_data, tmp_path, capsys, extra, message):
    if "--device" in extra and torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(SystemExit) as exit_info:
        train_gpt2.main(TINY_RUN + ["--data_root", tiny_data, "--log_dir", tmp_path / "log", "--max_steps", 1] + extra)
    assert exit_info.value.code == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "log").exists()


def test_flags_take_hyphens_or_underscores_and_help_states_no_none_default(tiny_data, tmp_path, capsys):
    train_gpt2.main(TINY_RUN + ["--data-root", tiny_data, "--log-dir", tmp_path / "log", "--max-steps", 2,
                                "--total-batch-size", 128, "--checkpoint-interval", 1])
    assert [r["step"] for r in read_metrics(tmp_path / "log") if "loss" in r] == [0, 1]
    train_gpt2.main(TINY_RUN + ["--data_root", tiny_data, "--log_dir", tmp_path / "log", "--max_steps", 3,
                                "--total_batch_size", 128, "--resume-from-checkpoint", tmp_path / "log" / "model_00001.pt"])
    assert "continuing at step 2" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        parse_args(["--help"])
    help_text = capsys.readouterr().out
    assert "(default: None)" not in help_text and "--max-steps is --max_steps" in " ".join(help_text.split())


def test_missing_data_root_names_the_fix(tmp_path):
    result = run_train(TINY_RUN + ["--data_root", tmp_path / "nope", "--log_dir", tmp_path / "log", "--max_steps", 1],
                       cwd=tmp_path)
    assert result.returncode == 1
    assert "python -m scripts.prepare_data" in result.stderr and "Traceback" not in result.stderr


def test_activation_checkpointing_gives_the_same_gradients():
    model = tiny_model()
    idx, targets = torch.randint(0, 50257, (2, 2, 16))
    _, loss = model(idx, targets)
    loss.backward()
    plain = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    model.activation_checkpointing = True
    calls, mlp = [], model.transformer.h[0].mlp
    mlp.forward = lambda x, forward=mlp.forward: calls.append(1) or forward(x)
    _, loss_ckpt = model(idx, targets)
    loss_ckpt.backward()
    assert len(calls) == 2  # the block ran again in the backward pass: its activations were not kept
    assert loss_ckpt.item() == loss.item()
    for g, p in zip(plain, model.parameters()):
        torch.testing.assert_close(p.grad, g)


def test_ddp_gradients_stay_views_into_its_buckets_through_accumulation(tmp_path):
    """Two gloo ranks, 2 micro batches per step: between the micro steps (under no_sync) and after
    the step, every gradient is a view into one of DDP's flat buckets (so there is no second copy),
    and the buckets are the same memory in every step."""
    proc = run_ranks("ddp_bucket_views.py", tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for rank in (0, 1):
        result = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert result["same"]  # the step's gradients were all-reduced
        # Step 0 starts with no gradients, and DDP rebuilds its buckets in gradient order after it;
        # from step 1 on: mid-accumulation and after each step, the same few flat buckets.
        buckets = result["seen"][2]
        assert 1 < len(buckets) < result["params"] / 4, result["seen"]
        assert result["seen"][2:] == [buckets] * 4, result["seen"]
