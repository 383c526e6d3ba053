"""Checkpoints of nanoGPT, build-nanogpt and llm.c: written here the way those trainers write them
(tests/foreign_trainers.py), converted, and checked to compute what the original model computed; the
models this trainer cannot hold are refused in one line, and no file runs code while it is read."""
import dataclasses
import sys
import zipfile

import numpy as np
import pytest
import torch

import checkpoint
import checkpoint_manager
import converters
from converters import ConverterError
from foreign_trainers import (LLMC_ORDER, ForeignGPT, RunsCode, Shape, batch, save_build_nanogpt, save_llmc,
                             train_steps, trained_nanogpt)
from model import GPT, GPTConfig, model_from_config


def loss_of(model, x, y):
    model.eval()
    with torch.no_grad():
        return model(x, y)[1].item()


def one_line(exc_info):
    message = str(exc_info.value)
    assert "\n" not in message and message
    return message


# -----------------------------------------------------------------------------
# Same loss as the trainer that wrote the file


def test_build_nanogpt_checkpoint_gives_the_same_loss(tmp_path):
    original = ForeignGPT(Shape(gelu="tanh", mask_buffer=True), seed=2)
    path = tmp_path / "model_05000.pt"
    save_build_nanogpt(original, path, step=5000, val_loss=3.0625, tmp_path=tmp_path)
    with zipfile.ZipFile(path) as zf:  # the fixture pickles its config as build-nanogpt's does
        pickled = zf.read(next(n for n in zf.namelist() if n.endswith("data.pkl")))
    assert b"c__main__\nGPTConfig" in pickled

    foreign = converters.read(path)

    assert foreign.kind == "build-nanogpt" and foreign.steps_done == 5000 and foreign.val_loss == 3.0625
    assert foreign.model_config == dict(block_size=32, vocab_size=50304, n_layer=2, n_head=2, n_embd=32,
                                        real_vocab_size=50304, gelu="tanh")
    assert foreign.optimizer is None and any("fresh AdamW" in n for n in foreign.notes)
    x, y = batch(0)
    assert loss_of(foreign.build_model(), x, y) == pytest.approx(loss_of(original, x, y), rel=1e-6)


def test_nanogpt_checkpoint_gives_the_same_loss_and_continues_its_adamw(tmp_path):
    original, optimizer, path = trained_nanogpt(tmp_path)
    raw = torch.load(path, weights_only=True)
    assert all(k.startswith("_orig_mod.") for k in raw["model"])
    assert all(s["exp_avg"].abs().sum() > 0 for s in raw["optimizer"]["state"].values())

    foreign = converters.read(path, for_training=True)

    assert foreign.kind == "nanogpt" and foreign.steps_done == 2 and foreign.best_val_loss == 3.25
    assert foreign.model_config["gelu"] == "none" and foreign.model_config["real_vocab_size"] == 50304
    assert foreign.run_config["learning_rate"] == 6e-4
    x, y = batch(0)
    model = foreign.build_model()
    assert loss_of(model, x, y) == pytest.approx(loss_of(original, x, y), rel=1e-6)

    assert foreign.optimizer is not None and any("maps onto" in n for n in foreign.notes)
    ours = model.configure_optimizer(0.1, 1e-3)
    ours.load_state_dict(foreign.optimizer)
    next_batch = [batch(99)]
    assert train_steps(model, ours, next_batch) == pytest.approx(train_steps(original, optimizer, next_batch), rel=1e-6)
    theirs = dict(original.named_parameters())
    for name, p in model.named_parameters():
        torch.testing.assert_close(p, theirs[name], rtol=1e-6, atol=1e-7)


def test_nanogpt_optimizer_state_that_does_not_map_is_left_out(tmp_path):
    """A modified nanoGPT whose AdamW groups differ from ours: its moments would land on the wrong
    tensors, so the weights convert and the optimizer starts fresh, with a note saying why."""
    model, _, good = trained_nanogpt(tmp_path, steps=1)
    groups = {"one group": [{"params": list(model.parameters())}],
              "swapped groups": [{"params": [p for p in model.parameters() if p.dim() < 2]},
                                 {"params": [p for p in model.parameters() if p.dim() >= 2]}]}
    for case, param_groups in groups.items():
        optimizer = torch.optim.AdamW(param_groups, lr=1e-3)
        train_steps(model, optimizer, [batch(5)])
        ckpt = torch.load(good, weights_only=True)
        ckpt["optimizer"] = optimizer.state_dict()
        path = tmp_path / f"{case.replace(' ', '_')}.pt"
        torch.save(ckpt, path)
        foreign = converters.read(path, for_training=True)
        assert foreign.optimizer is None, case
        assert any("does not map" in n and "fresh AdamW" in n for n in foreign.notes), case


def test_nanogpt_dropout_is_refused_for_training_only(tmp_path):
    original, _, path = trained_nanogpt(tmp_path, steps=1, dropout=0.1)

    foreign = converters.read(path)  # for inference
    assert any("dropout 0.1" in n for n in foreign.notes)
    x, y = batch(0)
    assert loss_of(foreign.build_model(), x, y) == pytest.approx(loss_of(original, x, y), rel=1e-6)

    with pytest.raises(ConverterError) as exc:
        converters.read(path, for_training=True)
    assert "dropout 0.1" in one_line(exc) and "no dropout" in str(exc.value) and str(path) in str(exc.value)


def test_llmc_file_gives_the_same_loss_over_the_real_vocabulary(tmp_path):
    """llm.c's train_gpt2.py writes its 50257-token GPT with the embedding padded to 50304 zero rows; its
    softmax covers the 50257 only, so the padding must be masked, not scored."""
    original = ForeignGPT(Shape(vocab_size=50257, gelu="tanh"), seed=3)
    x, y = batch(0)
    for dtype in ("fp32", "bf16"):
        path = tmp_path / f"gpt2_{dtype}.bin"
        save_llmc(original, path, dtype)
        foreign = converters.read(path)
        assert foreign.kind == "llm.c" and foreign.model_config["real_vocab_size"] == 50257
        assert foreign.model_config["vocab_size"] == 50304 and foreign.model_config["gelu"] == "tanh"
        reference = original
        if dtype == "bf16":  # the file holds bf16 weights: compare with the original rounded to them
            reference = ForeignGPT(original.shape)
            reference.load_state_dict({k: v.bfloat16().float() for k, v in original.state_dict().items()})
        assert loss_of(foreign.build_model(), x, y) == pytest.approx(loss_of(reference, x, y), rel=1e-6)


# -----------------------------------------------------------------------------
# Refusals


def test_models_this_trainer_cannot_hold_are_refused_in_one_line(tmp_path):
    cases = {}
    _, _, cases["no biases"] = trained_nanogpt(tmp_path / "nobias", steps=1, bias=False)
    _, _, cases["char-level"] = trained_nanogpt(tmp_path / "char", steps=1, vocab_size=65)
    _, _, good = trained_nanogpt(tmp_path, steps=1)
    edits = {
        "heads": lambda ckpt: ckpt["model_args"].update(n_head=3),
        "extra tensor": lambda ckpt: ckpt["model"].update({"_orig_mod.transformer.h.0.attn.rotary": torch.ones(4)}),
        "missing tensor": lambda ckpt: ckpt["model"].pop("_orig_mod.transformer.ln_f.bias"),
        "untied": lambda ckpt: ckpt["model"].update({"_orig_mod.lm_head.weight":
                                                     ckpt["model"]["_orig_mod.lm_head.weight"] + 1}),
    }
    for case, edit in edits.items():
        ckpt = torch.load(good, weights_only=True)
        edit(ckpt)
        cases[case] = tmp_path / f"{case.replace(' ', '_')}.pt"
        torch.save(ckpt, cases[case])
    expected = {"no biases": "bias=False", "char-level": "vocabulary of 65 tokens, fewer than GPT-2's 50257",
                "heads": "n_embd 32 is not divisible by n_head 3", "extra tensor": "transformer.h.0.attn.rotary",
                "missing tensor": "lacks tensors a GPT-2 of its shape has: transformer.ln_f.bias",
                "untied": "not tied"}
    for case, path in cases.items():
        with pytest.raises(ConverterError) as exc:
            converters.read(path)
        assert expected[case] in one_line(exc) and str(path) in str(exc.value), case


def test_write_llmc_refuses_the_exact_gelu(tmp_path):
    config = dict(block_size=32, n_layer=1, n_head=2, n_embd=32, gelu="none")
    with pytest.raises(ConverterError) as exc:
        converters.write_llmc(model_from_config(config), config, tmp_path / "m.bin")
    assert "tanh" in one_line(exc) and not (tmp_path / "m.bin").exists()


def test_hostile_pickles_are_refused_and_never_run(tmp_path):
    _, _, good = trained_nanogpt(tmp_path, steps=1)
    marker = tmp_path / "ran"
    slots = {"config": lambda ckpt: ckpt.update(config=RunsCode(marker)),
             "tensor": lambda ckpt: ckpt["model"].update({"_orig_mod.transformer.wte.weight": RunsCode(marker)})}
    for slot, edit in slots.items():
        ckpt = torch.load(good, weights_only=True)
        edit(ckpt)
        path = tmp_path / f"hostile_{slot}.pt"
        torch.save(ckpt, path)
        with pytest.raises(ConverterError) as exc:
            converters.read(path)
        assert "refused to load" in one_line(exc) and "system" in str(exc.value), slot
        assert not marker.exists(), slot
        torch.load(path, weights_only=False)  # the fixture is hostile: an unsafe load runs it
        assert marker.exists(), slot
        marker.unlink()


def test_build_nanogpt_config_class_is_never_looked_up(tmp_path, monkeypatch):
    """The file names __main__.GPTConfig; whatever class __main__ holds here must not be used."""
    original = ForeignGPT(Shape(gelu="tanh"), seed=4)
    path = tmp_path / "model_00250.pt"
    save_build_nanogpt(original, path, step=250, val_loss=4.5, tmp_path=tmp_path)
    marker = tmp_path / "ran"

    class GPTConfig:
        def __setstate__(self, state):
            marker.touch()

    monkeypatch.setattr(sys.modules["__main__"], "GPTConfig", GPTConfig, raising=False)
    foreign = converters.read(path)
    assert not marker.exists() and foreign.model_config["n_embd"] == 32
    torch.load(path, weights_only=False)  # an unsafe load would have used it
    assert marker.exists()


# -----------------------------------------------------------------------------
# llm.c's format


def our_model(seed=0):
    torch.manual_seed(seed)
    return GPT(GPTConfig(block_size=32, n_layer=2, n_head=2, n_embd=32))


def test_llmc_round_trip_keeps_the_logits(tmp_path):
    model = our_model().eval()
    config = dataclasses.asdict(model.config)
    x, _ = batch(0)
    with torch.no_grad():
        logits = model(x)[0]
    for dtype in ("fp32", "bf16"):
        path = tmp_path / f"model_{dtype}.bin"
        converters.write_llmc(model, config, path, dtype=dtype)
        foreign = converters.read_llmc(path)
        assert foreign.model_config == config
        with torch.no_grad():
            got = foreign.build_model()(x)[0]
        if dtype == "fp32":
            assert torch.equal(got, logits)
        else:
            rounded = GPT(model.config).eval()
            rounded.load_state_dict({k: v.bfloat16().float() for k, v in model.state_dict().items()})
            with torch.no_grad():
                assert torch.equal(got, rounded(x)[0])
            real = slice(0, model.config.real_vocab_size)
            torch.testing.assert_close(got[..., real], logits[..., real], rtol=0.05, atol=0.05)


def test_llmc_header_and_tensor_order(tmp_path):
    model = our_model(seed=1)
    for dtype, version, itemsize in (("fp32", 3, 4), ("bf16", 5, 2)):
        path = tmp_path / f"model_{dtype}.bin"
        converters.write_llmc(model.state_dict(), dataclasses.asdict(model.config), path, dtype=dtype)
        header = np.fromfile(path, dtype="<i4", count=256)
        assert header[:8].tolist() == [20240326, version, 32, 50257, 2, 2, 32, 50304] and not header[8:].any()
        # The tensors in llm.c's order: wte, wpe, each per-layer tensor for all layers, ln_f.
        state = model.state_dict()
        names = ["transformer.wte.weight", "transformer.wpe.weight"]
        names += [f"transformer.h.{i}.{n}" for n in LLMC_ORDER for i in range(2)]
        names += ["transformer.ln_f.weight", "transformer.ln_f.bias"]
        stored = np.fromfile(path, dtype="<f4" if dtype == "fp32" else "<i2", offset=1024)
        stored = torch.from_numpy(stored) if dtype == "fp32" else torch.from_numpy(stored).view(torch.bfloat16).float()
        expected = torch.cat([state[n].flatten() for n in names])
        assert path.stat().st_size == 1024 + expected.numel() * itemsize
        assert torch.equal(stored, expected if dtype == "fp32" else expected.bfloat16().float())


def test_bad_llmc_files_are_one_clear_line(tmp_path):
    good = tmp_path / "good.bin"
    converters.write_llmc(our_model(), dataclasses.asdict(our_model().config), good)
    data = good.read_bytes()
    header = np.frombuffer(data[:1024], dtype="<i4").copy()

    def variant(name, blob):
        path = tmp_path / name
        path.write_bytes(blob)
        return path

    shard, version4 = header.copy(), header.copy()
    shard[0], version4[1] = 20240520, 4
    cases = {
        variant("shard.bin", shard.tobytes() + data[1024:]): "token shard",
        variant("v4.bin", version4.tobytes() + data[1024:]): "version 4",
        variant("cut.bin", data[:-100]): "truncated",
        variant("long.bin", data + b"\0" * 8): "longer than its header says",
        variant("tiny.bin", data[:100]): "less than llm.c's 1024-byte header",
    }
    for path, expected in cases.items():
        with pytest.raises(ConverterError) as exc:
            converters.read(path)
        assert expected in one_line(exc) and str(path) in str(exc.value)


# -----------------------------------------------------------------------------
# This trainer's own files


def test_this_trainers_checkpoints_are_not_foreign(tmp_path):
    model = our_model()
    manager = checkpoint_manager.CheckpointManager(
        tmp_path, {"model": model, "optimizer": model.configure_optimizer(0.1, 1e-3),
                   "train_state": checkpoint.TrainState(), "rng": checkpoint.RandomState()},
        meta={"model_config": dataclasses.asdict(model.config), "run_config": {}}, interval=1)
    path = manager.save(0)
    manager.close()
    assert converters.detect(converters.load(path)) is None
    assert converters.read(path) is None
    plain = tmp_path / "pytorch_model.bin"  # a bare state dict, as Hugging Face names it
    torch.save(model.state_dict(), plain)
    assert converters.read(plain) is None
