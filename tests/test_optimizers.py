"""--optimizer muon: Muon for the blocks' matrices, AdamW for the rest, as one optimizer that every promise of the
trainer holds for: the loss falls, a CPU resume is bit-identical, a checkpoint of the other optimizer is refused in
one line (or its weights continue with --reset_optimizer), DDP and FSDP give one process's losses."""
import copy

import pytest
import torch

import optimizers
import train_gpt2
from conftest import REPO_ROOT, load_script, read_metrics, run_main
from model import GPT, GPTConfig, MODEL_PRESETS

# 128 tokens a step: 2 micro batches of 2 x 16 in one process, one per rank on two ranks (test_distributed's run).
ARGS = ["--model", "d2", "--n_layer", "2", "--n_embd", "64", "--n_head", "2", "--block_size", "32", "--seq_len", "16",
        "--micro_batch_size", "2", "--total_batch_size", "128", "--warmup_steps", "2", "--max_lr", "1e-3",
        "--eval_interval", "3", "--eval_steps", "1", "--max_new_tokens", "2", "--num_samples", "1",
        "--num_threads", "1", "--device", "cpu", "--max_steps", "6", "--optimizer", "muon"]
# Two ranks sum gradients in another order than one process accumulating them, and Muon orthogonalises in bf16,
# which can round such a difference up to one bf16 step of an update entry.
TOLERANCE = 2e-4


def tiny_model():
    torch.manual_seed(0)
    return GPT(GPTConfig(block_size=32, **MODEL_PRESETS["d2"]))


def logged(log_dir):
    return {(r["step"], key): r[key] for r in read_metrics(log_dir) for key in ("loss", "val_loss") if key in r}


def step(model, optimizer, lr, seed):
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randint(0, 50257, (2, 2, 32), generator=g)
    optimizer.zero_grad(set_to_none=True)
    _, loss = model(x, y)
    loss.backward()
    optimizers.set_lr(optimizer, lr)
    optimizer.step()
    return loss.item()


def test_muon_takes_the_block_matrices_and_adamw_the_embeddings_biases_and_norms():
    model = tiny_model()
    optimizer = optimizers.build(model, "muon", lr=1e-3, weight_decay=0.1, muon_lr=0.02)
    names = {id(p): name for name, p in model.named_parameters()}
    decayed, plain, muon = [[names[id(p)] for p in group["params"]] for group in optimizer.param_groups]
    assert decayed == ["transformer.wte.weight", "transformer.wpe.weight"]  # lm_head is wte: one tensor, once
    assert muon and all(n.startswith("transformer.h.") and n.endswith(".weight") and "ln_" not in n for n in muon)
    assert len(muon) == 4 * model.config.n_layer  # c_attn, attn.c_proj, c_fc, mlp.c_proj per block
    assert all(".bias" in n or "ln_" in n for n in plain)
    assert sorted(decayed + plain + muon) == sorted(names.values())  # every parameter, once
    assert [g["weight_decay"] for g in optimizer.param_groups] == [0.1, 0.0, 0.0]
    optimizers.set_lr(optimizer, 5e-4)  # half way down the schedule: Muon's LR is halved too
    assert [g["lr"] for g in optimizer.param_groups] == [5e-4, 5e-4, pytest.approx(0.01)]
    # AdamW's settings in the Muon run are the recipe's (model.py keeps its own copy)
    recipe = model.configure_optimizer(0.1, 1e-3).defaults
    assert {k: optimizer.defaults[k] for k in ("betas", "eps", "fused")} == {k: recipe[k] for k in ("betas", "eps", "fused")}


def test_the_state_dict_is_torch_optims_format_and_continues_bit_identically():
    model = tiny_model()
    optimizer = optimizers.build(model, "muon", lr=1e-3, weight_decay=0.1)
    for seed in range(3):
        step(model, optimizer, 1e-3, seed)
    saved = copy.deepcopy(optimizer.state_dict())  # torch's state_dict holds the live tensors
    # A single torch optimizer over these groups numbers the parameters 0..n-1 through the groups, in order.
    assert [i for g in saved["param_groups"] for i in g["params"]] == list(range(len(saved["state"])))
    n_adamw = sum(len(g["params"]) for g in saved["param_groups"][:2])
    assert all(set(saved["state"][i]) == {"exp_avg", "exp_avg_sq", "step"} for i in range(n_adamw))
    assert all(set(saved["state"][i]) == {"momentum_buffer"} for i in range(n_adamw, len(saved["state"])))
    assert optimizers.kind_of_state(saved) == "muon"
    assert optimizers.kind_of_state(model.configure_optimizer(0.1, 1e-3).state_dict()) == "adamw"

    weights = {k: v.clone() for k, v in model.state_dict().items()}
    expected = [step(model, optimizer, 1e-3, seed) for seed in (3, 4)]
    other = tiny_model()
    other.load_state_dict(weights)
    restored = optimizers.build(other, "muon", lr=1e-3, weight_decay=0.1)
    restored.load_state_dict(saved)
    assert [step(other, restored, 1e-3, seed) for seed in (3, 4)] == expected
    with pytest.raises(ValueError, match="does not map onto Muon"):
        restored.load_state_dict(model.configure_optimizer(0.1, 1e-3).state_dict())


def test_muon_lowers_the_loss_of_the_trainer(tiny_data, tmp_path, capsys):
    args = ["--model", "d2", "--seq_len", "32", "--micro_batch_size", "4", "--device", "cpu", "--num_threads", "1",
            "--total_batch_size", "256", "--max_steps", "30", "--warmup_steps", "5", "--max_lr", "3e-3",
            "--eval_interval", "15", "--eval_steps", "2", "--max_new_tokens", "2", "--num_samples", "1",
            "--optimizer", "muon", "--data_root", tiny_data, "--log_dir", tmp_path]
    assert run_main(train_gpt2.main, args) == 0
    out = capsys.readouterr().out
    assert "optimizer: Muon (peak lr 0.02, momentum 0.95, weight decay 0) for the blocks' 8 matrices" in out
    assert "optimizer            muon                     flag" in out  # the configuration table says so
    losses = [r["loss"] for r in read_metrics(tmp_path) if "loss" in r]
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 2.0, losses
    vals = [r["val_loss"] for r in read_metrics(tmp_path) if "val_loss" in r]
    assert len(vals) == 3 and vals[-1] < vals[0] - 1.0, vals


@pytest.fixture(scope="module")
def reference(random_data, tmp_path_factory):
    """One process with Muon, uninterrupted, checkpoints at steps 2, 4 and 5."""
    log_dir = tmp_path_factory.mktemp("muon_reference")
    assert run_main(train_gpt2.main, ARGS + ["--data_root", random_data, "--log_dir", log_dir,
                                             "--checkpoint_interval", 2]) == 0
    return logged(log_dir), log_dir


def test_a_resume_continues_bit_identically_on_the_cpu(random_data, reference, tmp_path):
    expected, reference_dir = reference
    assert run_main(train_gpt2.main, ARGS + ["--data_root", random_data, "--log_dir", tmp_path,
                                             "--resume_from_checkpoint", reference_dir / "model_00002.pt"]) == 0
    got = logged(tmp_path)
    assert got == {k: v for k, v in expected.items() if k[0] >= 3}  # exactly: no tolerance


def test_a_resume_with_the_other_optimizer_is_refused_in_one_line_or_resets_it(random_data, reference, tmp_path,
                                                                               capsys):
    _, reference_dir = reference
    adamw = [a for a in ARGS if a != "muon"][:-1] + ["--optimizer", "adamw"]
    resume = ["--data_root", random_data, "--log_dir", tmp_path, "--resume_from_checkpoint",
              reference_dir / "model_00002.pt"]
    capsys.readouterr()
    assert run_main(train_gpt2.main, adamw + resume) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and len(err.strip().splitlines()) == 1, err
    assert ("the checkpoint's run was trained with --optimizer muon: drop --optimizer adamw to continue it, or pass "
            "--reset_optimizer to continue its weights with a fresh adamw") in err
    assert not (tmp_path / "metrics.jsonl").exists()
    assert run_main(train_gpt2.main, adamw + resume + ["--reset_optimizer"]) == 0
    assert "weights loaded with a fresh optimizer (--reset_optimizer)" in capsys.readouterr().out
    assert [r["step"] for r in read_metrics(tmp_path) if "loss" in r] == [3, 4, 5]


def test_init_from_optimizer_continues_muon_and_refuses_it_for_adamw(random_data, reference, tmp_path, capsys):
    _, reference_dir = reference
    init = ["--data_root", random_data, "--init_from", reference_dir / "model_00005.pt", "--init_from_optimizer"]
    shape = {"--model", "--n_layer", "--n_embd", "--n_head"}  # --init_from takes the shape from the file
    args = [a for i, a in enumerate(ARGS) if a not in shape and (i == 0 or ARGS[i - 1] not in shape)]
    assert run_main(train_gpt2.main, args + init + ["--log_dir", tmp_path / "muon"]) == 0
    assert "optimizer: the Muon and AdamW moments and step counts of" in capsys.readouterr().out
    adamw = args[:-1] + ["adamw"]
    assert run_main(train_gpt2.main, adamw + init + ["--log_dir", tmp_path / "adamw"]) == 1
    err = capsys.readouterr().err
    assert "holds the state of --optimizer muon, which does not map onto --optimizer adamw" in err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "adamw").exists()


def test_inspect_names_the_optimizer(reference, capsys):
    _, reference_dir = reference
    tool = load_script("checkpoint_tool.py")
    assert run_main(tool.main, ["inspect", reference_dir / "model_00005.pt"]) == 0
    out = capsys.readouterr().out
    assert "optimizer       Muon and AdamW, " in out and '"optimizer": "muon"' in out


@pytest.mark.parametrize("flag, value, message", [
    ("--muon_momentum", "1", "--muon_momentum 1.0 cannot work: use a momentum in [0, 1)"),
    ("--muon_lr", "-1", "--muon_lr -1.0 cannot work: use a finite learning rate"),
    ("--muon_weight_decay", "nan", "--muon_weight_decay nan cannot work"),
])
def test_a_muon_setting_that_cannot_work_is_one_line(random_data, tmp_path, capsys, flag, value, message):
    assert run_main(train_gpt2.main, ARGS + ["--data_root", random_data, "--log_dir", tmp_path, flag, value]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and len(err.strip().splitlines()) == 1, err


def torchrun(*args):
    import os
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(REPO_ROOT / "train_gpt2.py"), *map(str, args)], capture_output=True, text=True,
                          timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"))


def assert_close(got, want):
    assert sorted(got) == sorted(want)
    assert all(abs(got[k] - want[k]) < TOLERANCE for k in want), [(k, got[k], want[k]) for k in want]


def test_ddp_on_two_ranks_gives_one_process_losses(random_data, reference, tmp_path):
    expected, _ = reference
    run = torchrun(*ARGS, "--data_root", random_data, "--log_dir", tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    assert_close(logged(tmp_path), expected)


def test_fsdp_steps_whole_matrices_gives_one_process_losses_and_its_checkpoint_resumes_in_one(random_data, reference,
                                                                                             tmp_path):
    """torch's Muon on FSDP2's sharded parameters: DTensor gathers what each Newton-Schulz matmul needs, and the LR
    scale reads the whole matrix's shape, so two ranks step as one process does."""
    expected, _ = reference
    fsdp = tmp_path / "fsdp"
    run = torchrun(*ARGS, "--data_root", random_data, "--log_dir", fsdp, "--fsdp", "--checkpoint_interval", 2)
    assert run.returncode == 0, run.stderr[-3000:]
    assert_close(logged(fsdp), expected)
    one = tmp_path / "one"
    assert run_main(train_gpt2.main, ARGS + ["--data_root", random_data, "--log_dir", one,
                                             "--resume_from_checkpoint", fsdp / "model_00002.pt"]) == 0
    assert_close(logged(one), {k: v for k, v in expected.items() if k[0] >= 3})
