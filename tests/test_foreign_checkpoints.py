"""Other trainers' checkpoints everywhere this trainer takes one: nanoGPT's out/ckpt.pt, build-nanogpt's
log/model_05000.pt (pickled by a script run as __main__, as build-nanogpt writes it) and llm.c's .bin load,
sample, evaluate, inspect, verify and export, and start a new run with --init_from at the original model's
loss; nanoGPT's AdamW continues with --init_from_optimizer; hostile pickles in their slots are refused
by every command, and never run."""
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

import checkpoint
import converters
import dataloader
import gpt2_hf
import hellaswag
import shards
import train_gpt2
from conftest import TINY_RUN, load_script, read_metrics, run_main
from foreign_trainers import ForeignGPT, RunsCode, Shape, batch, save_build_nanogpt, save_llmc, trained_nanogpt
from model import sample_texts

KINDS = ["nanogpt", "build-nanogpt", "llm.c"]
# What `init_from PATH: ...` and the tools say each fixture file is.
SUMMARIES = {"nanogpt": "nanoGPT checkpoint, 2 steps done, best val loss 3.2500",
             "build-nanogpt": "build-nanogpt checkpoint, 5000 steps done, val loss 3.0625",
             "llm.c": "llm.c model file"}
HELLASWAG = Path(__file__).resolve().parent / "fixtures" / "hellaswag_tiny.jsonl"
assert TINY_RUN[:2] == ["--model", "d2"]
SHAPELESS_RUN = TINY_RUN[2:]  # --init_from sets the shape
tool = load_script("checkpoint_tool.py")


def run_tool(*argv):
    return run_main(tool.main, argv)


@pytest.fixture(scope="module")
def trainers(tmp_path_factory):
    """{kind: (the original model, its file)}: nanoGPT's out/ckpt.pt after two steps of its AdamW;
    build-nanogpt's log/model_05000.pt and llm.c's log/gpt2_d2.bin side by side in one folder."""
    root = tmp_path_factory.mktemp("trainers")
    nanogpt, _, nanogpt_path = trained_nanogpt(root / "out")
    (root / "log").mkdir()
    build_nanogpt = ForeignGPT(Shape(gelu="tanh", mask_buffer=True), seed=2)
    save_build_nanogpt(build_nanogpt, root / "log" / "model_05000.pt", step=5000, val_loss=3.0625, tmp_path=root)
    llmc = ForeignGPT(Shape(vocab_size=50257, gelu="tanh"), seed=3)
    save_llmc(llmc, root / "log" / "gpt2_d2.bin")
    return {"nanogpt": (nanogpt, nanogpt_path), "build-nanogpt": (build_nanogpt, root / "log" / "model_05000.pt"),
            "llm.c": (llmc, root / "log" / "gpt2_d2.bin")}


def loss_of(model, x, y):
    model.eval()
    with torch.no_grad():
        return model(x, y)[1].item()


# -----------------------------------------------------------------------------
# Load, sample, evaluate


@pytest.mark.parametrize("kind", KINDS)
def test_load_model_computes_what_the_trainer_computed_and_says_what_it_chose(trainers, kind, capsys):
    original, path = trainers[kind]
    model, _ = checkpoint.load_model(path)
    x, y = batch(0)
    assert loss_of(model, x, y) == pytest.approx(loss_of(original, x, y), rel=1e-6)
    assert capsys.readouterr().out.splitlines() == checkpoint.read_foreign(path).notes  # one line each (the CLIs log to stderr)


@pytest.mark.parametrize("kind", KINDS)
def test_sample_script_samples_each_trainers_file_seeded(trainers, kind, capsys):
    _, path = trainers[kind]
    assert run_main(load_script("sample.py").main, ["--checkpoint", path, "--prompt", "ROMEO:", "--num_samples", 2,
                                                    "--max_new_tokens", 8, "--device", "cpu", "--seed", 7]) == 0
    out, err = capsys.readouterr()
    texts = sample_texts(checkpoint.read_foreign(path).build_model(), shards.get_tokenizer(), "ROMEO:", 2, 8,
                         torch.device("cpu"), "fp32", seed=7)
    assert out == "".join(f"--- sample {i} ---\nROMEO:{text}\n" for i, text in enumerate(texts))
    assert checkpoint.read_foreign(path).notes[0] in err.splitlines()


@pytest.mark.parametrize("kind", KINDS)
def test_hellaswag_cli_scores_each_trainers_file(trainers, kind, capsys):
    _, path = trainers[kind]
    assert run_main(hellaswag.main, ["--checkpoint", path, "--data_file", HELLASWAG, "--device", "cpu",
                                     "--limit", 6]) == 0
    result = json.loads(capsys.readouterr().out)  # the one line on stdout
    rendered = hellaswag.render_examples(hellaswag.load_examples(HELLASWAG, limit=6))
    expected = hellaswag.evaluate(checkpoint.read_foreign(path).build_model(), rendered, "cpu")
    assert result["n"] == 6
    assert (result["acc"], result["acc_norm"]) == pytest.approx((expected["acc"], expected["acc_norm"]))


# -----------------------------------------------------------------------------
# python checkpoint.py inspect | verify | list | export


def test_inspect_says_what_each_file_is(trainers, capsys):
    nanogpt, path = trainers["nanogpt"]
    assert run_tool("inspect", path) == 0
    out = capsys.readouterr().out.splitlines()
    expected = ["kind            nanoGPT checkpoint", "step            1 (the last completed step: 2 steps done)",
                "best val loss   3.25", f"optimizer       AdamW, {3 * len(list(nanogpt.parameters()))} tensors (13.1 MB)"]
    expected += [f"note            {note}" for note in checkpoint.read_foreign(path).notes]
    assert set(expected) <= set(out)
    assert not any(line.startswith(("format version", "torch version", "dataloader")) for line in out)
    for kind, lines in (("build-nanogpt", ["kind            build-nanogpt checkpoint", "val loss        3.0625",
                                           "step            4999 (the last completed step: 5000 steps done)"]),
                        ("llm.c", ["kind            llm.c model file", "step            -", "optimizer       none"])):
        assert run_tool("inspect", trainers[kind][1]) == 0
        assert set(lines) <= set(capsys.readouterr().out.splitlines()), kind


def test_list_and_verify_show_them_where_they_sit(trainers, tmp_path, capsys):
    log_dir = tmp_path / "log"
    log_dir.mkdir()
    for kind in ("build-nanogpt", "llm.c"):
        shutil.copy(trainers[kind][1], log_dir)
    tokenizer = np.zeros(256, dtype="<i4")
    tokenizer[0] = 20240328  # llm.c's tokenizer file: a .bin, but no model
    (log_dir / "gpt2_tokenizer.bin").write_bytes(tokenizer.tobytes())

    assert run_tool("list", log_dir) == 0
    out = capsys.readouterr().out
    rows = {line.split()[0]: line for line in out.splitlines()[1:]}
    assert set(rows) == {"model_05000.pt", "gpt2_d2.bin"}
    assert rows["model_05000.pt"].split()[1:5] == ["4999", "-", "-", "3.0625"]  # no epoch, no train loss, no val step
    assert rows["model_05000.pt"].endswith("no  (build-nanogpt checkpoint)")
    assert rows["gpt2_d2.bin"].endswith("no  (llm.c model file)")
    assert run_tool("list", trainers["nanogpt"][1].parent) == 0
    assert capsys.readouterr().out.splitlines()[1].endswith("yes  (nanoGPT checkpoint)")

    assert run_tool("verify", log_dir) == 0
    out = capsys.readouterr().out.splitlines()
    assert f"ok   {log_dir / 'model_05000.pt'}  step 4999  28 tensors, 6.5 MB read  (build-nanogpt checkpoint)" in out
    assert f"ok   {log_dir / 'gpt2_d2.bin'}  step None  28 tensors, 6.5 MB read  (llm.c model file)" in out
    assert len(out) == 2


def test_verify_reads_every_tensor_of_another_trainers_file(trainers, tmp_path, capsys):
    ckpt = torch.load(trainers["nanogpt"][1], weights_only=True)
    ckpt["model"]["_orig_mod.transformer.h.1.mlp.c_fc.bias"][3] = float("nan")
    torch.save(ckpt, tmp_path / "ckpt.pt")
    cut = tmp_path / "gpt2_d2.bin"
    cut.write_bytes(trainers["llm.c"][1].read_bytes()[:-4])
    assert run_tool("verify", tmp_path) == 1
    out = capsys.readouterr().out
    assert f"BAD  {tmp_path / 'ckpt.pt'}: {tmp_path / 'ckpt.pt'}: transformer.h.1.mlp.c_fc.bias holds NaN or inf" in out
    assert f"BAD  {cut}: {cut} has" in out and "truncated" in out


def test_export_writes_this_trainers_files_and_llmc_files(trainers, tmp_path, capsys):
    nanogpt, build_nanogpt, llmc = (trainers[kind][1] for kind in KINDS)
    assert run_tool("export", nanogpt, "--out", tmp_path / "n.pt") == 0
    assert capsys.readouterr().out.endswith("(nanoGPT checkpoint)\n")
    x, y = batch(0)
    assert loss_of(checkpoint.load_model(tmp_path / "n.pt")[0], x, y) == pytest.approx(
        loss_of(trainers["nanogpt"][0], x, y), rel=1e-6)

    # llm.c's file back to llm.c's format: byte for byte
    assert run_tool("export", llmc, "--out", tmp_path / "again.bin") == 0
    assert (tmp_path / "again.bin").read_bytes() == llmc.read_bytes()
    # build-nanogpt's to llm.c's in bf16: the weights rounded, the model the same
    assert run_tool("export", build_nanogpt, "--out", tmp_path / "b.bin", "--dtype", "bf16") == 0
    assert np.fromfile(tmp_path / "b.bin", dtype="<i4", count=2).tolist() == [20240326, 5]
    original = trainers["build-nanogpt"][0]
    rounded = ForeignGPT(original.shape)
    rounded.load_state_dict({k: v.bfloat16().float() for k, v in original.state_dict().items()})
    assert loss_of(checkpoint.load_model(tmp_path / "b.bin")[0], x, y) == pytest.approx(loss_of(rounded, x, y), rel=1e-6)

    # nanoGPT's exact GELU is not what llm.c computes: refused, nothing written
    capsys.readouterr()
    assert run_tool("export", nanogpt, "--out", tmp_path / "n.bin") == 1
    err = capsys.readouterr().err
    assert err.startswith("error: cannot write") and "tanh" in err and not (tmp_path / "n.bin").exists()
    assert run_tool("export", llmc, "--out", tmp_path / "h.bin", "--dtype", "fp16") == 2


@pytest.mark.parametrize("kind", KINDS)
def test_hf_export_computes_what_the_trainer_computed(trainers, kind, tmp_path):
    transformers = pytest.importorskip("transformers")
    original, path = trainers[kind]
    assert run_main(gpt2_hf.main, ["export", path, "--out", tmp_path / "hf"]) == 0
    hf_model = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "hf").eval()
    # nanoGPT's exact GELU is transformers' "gelu"; where nothing is masked, every row is a token
    vocab = {"nanogpt": 50304, "build-nanogpt": 50304, "llm.c": 50257}[kind]
    assert hf_model.config.activation_function == ("gelu" if kind == "nanogpt" else "gelu_new")
    assert hf_model.config.vocab_size == vocab
    x, _ = batch(1)
    with torch.no_grad():
        torch.testing.assert_close(hf_model(x).logits, original.eval()(x)[0][..., :vocab], atol=1e-4, rtol=1e-5)


# -----------------------------------------------------------------------------
# python train_gpt2.py --init_from FILE


def init_run(tiny_data, log_dir, path, *extra):
    """One step of a tiny run from path: 256 tokens, 2 micro batches of 4 x 32."""
    return run_main(train_gpt2.main, SHAPELESS_RUN + ["--data_root", tiny_data, "--log_dir", log_dir, "--init_from",
                                                      path, "--total_batch_size", 256, "--max_steps", 1, *extra])


def first_step_loss(model, tiny_data):
    """The loss a model has on the first step's batch of the tiny data: what step 0 logs."""
    loader = dataloader.ShardedDataLoader(tiny_data, "train", 4, 32, 0, 1)
    return sum(loss_of(model, *loader.next_batch()) for _ in range(2)) / 2


def adamw_step_counts(log_dir):
    state = checkpoint.load_checkpoint(log_dir / "model_00000.pt")["optimizer"]["state"]
    return {float(s["step"]) for s in state.values()}


@pytest.mark.parametrize("kind", ["build-nanogpt", "llm.c"])
def test_init_from_a_file_starts_a_new_run_at_the_original_models_loss(trainers, kind, tiny_data, tmp_path, capsys):
    original, path = trainers[kind]
    assert init_run(tiny_data, tmp_path / "log", path) == 0
    out = capsys.readouterr().out.splitlines()
    assert f"init_from {path}: {SUMMARIES[kind]}; training starts at step 0 of a new run" in out
    assert set(checkpoint.read_foreign(path).notes) <= set(out)
    first = read_metrics(tmp_path / "log")[0]
    assert first["step"] == 0 and first["loss"] == pytest.approx(first_step_loss(original, tiny_data), rel=1e-5)


def test_init_from_nanogpt_offers_its_adamw_and_continues_it_with_the_flag(trainers, tiny_data, tmp_path, capsys):
    original, path = trainers["nanogpt"]
    # Without the flag: a fresh AdamW and a line offering the file's. --max_lr 0 keeps the weights.
    assert init_run(tiny_data, tmp_path / "fresh", path, "--max_lr", 0) == 0
    out = capsys.readouterr().out.splitlines()
    assert f"init_from {path}: {SUMMARIES['nanogpt']}; training starts at step 0 of a new run" in out
    assert (f"optimizer: fresh AdamW; {path} holds an AdamW state that maps onto it: --init_from_optimizer "
            "continues it") in out
    loss = read_metrics(tmp_path / "fresh")[0]["loss"]
    assert loss == pytest.approx(first_step_loss(original, tiny_data), rel=1e-5)
    assert adamw_step_counts(tmp_path / "fresh") == {1.0}

    # With it: nanoGPT's two steps go on.
    assert init_run(tiny_data, tmp_path / "continued", path, "--init_from_optimizer") == 0
    assert any("(--init_from_optimizer)" in line for line in capsys.readouterr().out.splitlines())
    assert adamw_step_counts(tmp_path / "continued") == {3.0}

    # This trainer's own checkpoint the same way: its weights (unchanged at --max_lr 0) and its AdamW.
    own = tmp_path / "fresh" / "model_00000.pt"
    assert init_run(tiny_data, tmp_path / "own", own, "--init_from_optimizer") == 0
    assert any(line.startswith(f"init_from {own}: this trainer's checkpoint, 1 step done")
               for line in capsys.readouterr().out.splitlines())
    assert read_metrics(tmp_path / "own")[0]["loss"] == pytest.approx(loss, rel=1e-6)
    assert adamw_step_counts(tmp_path / "own") == {2.0}


@pytest.mark.parametrize("case, message", [
    ("dropout", "was trained with dropout 0.1 (nanoGPT's model_args), and this trainer has no dropout"),
    ("no optimizer", "holds no AdamW state that maps onto this trainer's; drop the flag"),
    ("shape flag", "--init_from takes the model shape from the weights"),
])
def test_init_from_mistakes_are_one_line_and_write_nothing(trainers, tiny_data, tmp_path, capsys, case, message):
    path, extra = trainers["build-nanogpt"][1], []
    if case == "dropout":
        _, _, path = trained_nanogpt(tmp_path / "out", steps=1, dropout=0.1)
    elif case == "no optimizer":
        extra = ["--init_from_optimizer"]
    else:
        extra = ["--model", "d2"]
    assert init_run(tiny_data, tmp_path / "log", path, *extra) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "log").exists()


def test_resume_from_another_trainers_file_names_init_from(trainers, tiny_data, tmp_path, capsys):
    for kind in ("build-nanogpt", "llm.c"):
        path = trainers[kind][1]
        assert run_main(train_gpt2.main, TINY_RUN + ["--data_root", tiny_data, "--log_dir", tmp_path / "log",
                                                     "--max_steps", 1, "--resume_from_checkpoint", path]) == 1
        err = capsys.readouterr().err
        assert err.startswith(f"error: cannot resume from {path}: {path} is another trainer's file "
                              f"({converters.KINDS[kind]})") and f"--init_from {path}" in err, err


# -----------------------------------------------------------------------------
# Hostile files


def test_hostile_pickles_in_their_slots_are_refused_everywhere(trainers, tiny_data, tmp_path, capsys):
    """A nanoGPT file with code in a tensor's place, and a build-nanogpt file with code where its GPTConfig
    goes (the one object the safe loader builds): every command refuses them, and the code never runs."""
    marker = tmp_path / "ran"
    nanogpt = torch.load(trainers["nanogpt"][1], weights_only=True)
    (tmp_path / "out").mkdir()
    (tmp_path / "log").mkdir()
    hostile = [tmp_path / "out" / "ckpt.pt", tmp_path / "log" / "model_05000.pt"]
    torch.save({**nanogpt, "model": {**nanogpt["model"], "_orig_mod.transformer.wte.weight": RunsCode(marker)}},
               hostile[0])
    torch.save({"model": nanogpt["model"], "config": RunsCode(marker), "step": 5000, "val_loss": 3.0}, hostile[1])
    sample, run_dir = load_script("sample.py"), tmp_path / "run"
    for path in hostile:
        with pytest.raises(checkpoint.CheckpointError, match="refused to load"):
            checkpoint.load_model(path)
        commands = {"inspect": lambda: run_tool("inspect", path), "verify": lambda: run_tool("verify", path),
                    "list": lambda: run_tool("list", path.parent),
                    "export": lambda: run_tool("export", path, "--out", tmp_path / "x.pt"),
                    "sample": lambda: run_main(sample.main, ["--checkpoint", path, "--device", "cpu"]),
                    "hellaswag": lambda: run_main(hellaswag.main, ["--checkpoint", path, "--data_file", HELLASWAG,
                                                                   "--device", "cpu"]),
                    "init_from": lambda: init_run(tiny_data, run_dir, path)}
        for name, command in commands.items():
            assert command() == 1, (path, name)
            result = capsys.readouterr()
            assert "refused to load" in result.out + result.err and "system" in result.out + result.err, (path, name)
        assert not marker.exists() and not run_dir.exists() and not (tmp_path / "x.pt").exists()
        torch.load(path, weights_only=False)  # the fixture is hostile: an unsafe load runs it
        assert marker.exists()
        marker.unlink()
