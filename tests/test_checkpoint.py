"""CheckpointManager and the checkpoint tools, in process, on a tiny GPT: what a user relies on
when a run crashes, the disk fills up or a file gets damaged."""
import errno
import os
import pickle
import random
import subprocess
import sys
import threading

import numpy as np
from pathlib import Path

import pytest
import torch

import checkpoint
import run_folder
import run_state
import checkpoint_manager
import files
from checkpoint import CheckpointError, load_checkpoint, read_latest, step_path
from checkpoint_manager import CheckpointManager
from conftest import load_script, run_main
from dataloader import ShardedDataLoader
from model import GPT, GPTConfig
from shards import shard_path, write_shard

tool = load_script("checkpoint_tool.py")


def run_tool(*argv):
    return run_main(tool.main, argv)

CONFIG = dict(block_size=32, vocab_size=96, n_layer=2, n_head=2, n_embd=32)
B, T = 2, 16


@pytest.fixture
def data(tmp_path):
    tokens = np.random.default_rng(0).integers(0, CONFIG["vocab_size"], 20_000)
    write_shard(shard_path(tmp_path / "data", "tiny", "train", 0), tokens)
    return tmp_path / "data"


@pytest.fixture
def log_dir(tmp_path):
    return tmp_path / "log"


class Run:
    """A model, optimizer, loader and manager built the way train_gpt2's loop builds them."""

    def __init__(self, data, log_dir, seed=0, config=CONFIG, scaler=None, **manager_kwargs):
        torch.manual_seed(seed)
        self.model = GPT(GPTConfig(**config))
        self.optimizer = self.model.configure_optimizer(0.1, 1e-3)
        self.loader = ShardedDataLoader(data, "train", B, T)
        self.state = run_state.TrainState()
        manager_kwargs.setdefault("checkpoint_interval", 1)
        parts = {"model": self.model, "optimizer": self.optimizer, "scaler": scaler, "dataloader": self.loader,
                 "rng": run_state.RandomState(), "train_state": self.state}
        meta = {"model_config": vars(GPTConfig(**config)), "run_config": {"max_steps": 100}}
        self.ckpt = CheckpointManager(log_dir, parts, meta=meta, **manager_kwargs)
        self.log_dir = log_dir

    def resume(self, auto=False, path=None, reset_optimizer=False):
        """As the trainer resumes: run_folder chooses (and plans what to move aside), the manager loads."""
        found = run_folder.find_resume(self.log_dir, auto, path, reset_optimizer)
        if found is None:
            return 0
        start = self.ckpt.load(found, reset_optimizer)
        run_folder.make_room(self.log_dir, found)
        return start

    def save(self, step, train_loss=1.0, val_loss=None, force=False):
        improved = self.state.record(step, train_loss, val_loss)
        return self.ckpt.maybe_save(step, best=improved, force=force)

    def step(self):
        x, y = self.loader.next_batch()
        _, loss = self.model(x, y)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return loss.item()

    def train(self, start, stop, val_losses=None):
        losses = {}
        for step in range(start, stop):
            losses[step] = self.step()
            val = val_losses[step] if val_losses else None
            self.save(step, losses[step], val, force=step == stop - 1)
        self.ckpt.close()
        return losses


def names(log_dir):
    return sorted(p.name for p in log_dir.iterdir() if p.name.startswith("model_"))


def test_atomic_write_keeps_the_old_file_when_the_write_raises(tmp_path):
    path = tmp_path / "model_00001.pt"
    checkpoint.save_file({"old": torch.ones(3)}, path)
    before = path.read_bytes()

    def torn_write(f):
        f.write(b"half a checkpoint")
        raise RuntimeError("killed mid-write")

    with pytest.raises(files.WriteError, match="the file there before, if any, is untouched"):
        files.atomic_write(path, torn_write)
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["model_00001.pt"]  # no temp file left behind


def test_latest_is_a_symlink_to_the_newest_checkpoint(data, log_dir):
    Run(data, log_dir).train(0, 4)
    link = log_dir / checkpoint.LATEST_NAME
    assert link.is_symlink() and os.readlink(link) == "model_00003.pt"
    assert read_latest(log_dir) == step_path(log_dir, 3).resolve()


def test_latest_falls_back_to_a_pointer_file_where_symlinks_fail(data, log_dir, monkeypatch):
    Run(data, log_dir).train(0, 2)  # a real symlink first: the pointer file must replace it
    monkeypatch.setattr(os, "symlink", lambda *a, **k: (_ for _ in ()).throw(OSError(errno.EPERM, "no symlinks here")))
    Run(data, log_dir).train(0, 4)
    link = log_dir / checkpoint.LATEST_NAME
    assert not link.is_symlink() and link.read_text() == checkpoint.POINTER_MAGIC + "model_00003.pt"
    assert read_latest(log_dir) == step_path(log_dir, 3).resolve()
    assert Run(data, log_dir).resume(auto=True) == 4


def test_keep_last_n_deletes_the_oldest(data, log_dir):
    Run(data, log_dir, keep_last_n_checkpoints=2).train(0, 6)
    assert names(log_dir) == ["model_00004.pt", "model_00005.pt"]


def test_keep_last_n_keeps_the_newest_and_the_newest_healthy_and_a_rewind_moves_newer_files_aside(data, log_dir):
    Run(data, log_dir).train(0, 5)  # model_00001..4
    run = Run(data, log_dir, keep_last_n_checkpoints=1)
    run.resume(path=step_path(log_dir, 1))  # back to step 1: 00002..4 of the old timeline move aside
    assert names(log_dir) == ["model_00001.pt"] and len(list(log_dir.glob("rewound_*/model_*.pt"))) == 3
    run.train(2, 4)
    # 00003 is the newest; 00002 the newest one a later step's loss vouched for: both stay, 00001 goes
    assert names(log_dir) == ["model_00002.pt", "model_00003.pt"]
    assert read_latest(log_dir) == step_path(log_dir, 3).resolve()


def test_save_optimizer_latest_strips_the_optimizer_from_older_files(data, log_dir):
    Run(data, log_dir, save_optimizer="latest").train(0, 4)
    assert [load_checkpoint(step_path(log_dir, s))["optimizer"] is None for s in (1, 2, 3)] == [True, True, False]
    assert step_path(log_dir, 1).stat().st_size < 0.5 * step_path(log_dir, 3).stat().st_size
    assert Run(data, log_dir).resume(auto=True) == 4
    with pytest.raises(CheckpointError, match="weights only.*--reset_optimizer"):
        Run(data, log_dir).resume(path=step_path(log_dir, 1))
    assert Run(data, log_dir).resume(path=step_path(log_dir, 1), reset_optimizer=True) == 2


def test_best_model_is_written_only_when_validation_loss_improves(data, log_dir):
    run = Run(data, log_dir, checkpoint_interval=0)
    best = log_dir / checkpoint.BEST_NAME
    for step, val in enumerate([5.0, 4.0, 4.5, 3.0, float("nan")]):
        run.step()
        run.save(step, val_loss=val)
        saved = load_checkpoint(best)
        assert (saved["train_state"]["step"], saved["train_state"]["val_loss"]) == [(0, 5.0), (1, 4.0), (1, 4.0), (3, 3.0), (3, 3.0)][step]
    assert saved["optimizer"] is None and names(log_dir) == []


def test_resume_restores_model_optimizer_data_and_losses_exactly(data, log_dir):
    expected = Run(data, log_dir, checkpoint_interval=3).train(0, 6)
    resumed = Run(data, log_dir / "other", seed=123)  # another init: everything must come from the file
    resumed.ckpt.log_dir = log_dir
    assert resumed.resume(path=step_path(log_dir, 3)) == 4
    assert [resumed.step() for _ in range(2)] == [expected[4], expected[5]]


def test_auto_resume_skips_truncated_garbage_and_bit_flipped_files(data, log_dir, capsys):
    Run(data, log_dir).train(0, 5)  # model_00001..4; latest -> 4
    newest = step_path(log_dir, 4).read_bytes()
    step_path(log_dir, 4).write_bytes(newest[: len(newest) // 2])
    step_path(log_dir, 3).write_bytes(os.urandom(4096))
    flipped = bytearray(step_path(log_dir, 2).read_bytes())
    flipped[len(flipped) // 2] ^= 0xFF  # inside a tensor: torch.load alone would not notice
    step_path(log_dir, 2).write_bytes(bytes(flipped))
    assert Run(data, log_dir).resume(auto=True) == 2
    out = capsys.readouterr().out
    for name in ("model_00004.pt", "model_00003.pt", "model_00002.pt"):
        assert f"skipping {name}" in out
    assert "CRC" in out and "auto-resume: " + str(step_path(log_dir, 1).resolve()) in out


def test_auto_resume_without_checkpoints_starts_fresh(data, log_dir, capsys):
    assert Run(data, log_dir).resume(auto=True) == 0
    assert "starting fresh" in capsys.readouterr().out


def test_explicit_resume_of_a_missing_or_bad_file_lists_the_checkpoints(data, log_dir):
    Run(data, log_dir).train(0, 3)
    step_path(log_dir, 2).write_bytes(b"garbage")
    for bad in (log_dir / "model_00042.pt", step_path(log_dir, 2)):
        with pytest.raises(CheckpointError) as err:
            Run(data, log_dir).resume(path=bad)
        assert str(bad) in str(err.value)
        assert "Checkpoints in" in str(err.value) and "model_00001.pt" in str(err.value)


class RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_pickle_that_would_run_code_is_refused_and_never_runs(data, log_dir, tmp_path):
    marker = tmp_path / "code_ran"
    evil = step_path(log_dir, 7)
    log_dir.mkdir()
    torch.save({"format_version": 1, "step": 7, "model": RunsCode(marker)}, evil)
    legacy = tmp_path / "legacy.pt"  # a raw pickle, as torch.save wrote before its zip format
    legacy.write_bytes(pickle.dumps({"model": RunsCode(marker)}, protocol=2))
    for path in (evil, legacy):
        with pytest.raises(CheckpointError, match="refused to load .*posix.system.*run code"):
            load_checkpoint(path)
    newer_protocol = tmp_path / "protocol4.pt"
    newer_protocol.write_bytes(pickle.dumps({"model": RunsCode(marker)}, protocol=4))
    with pytest.raises(CheckpointError):
        load_checkpoint(newer_protocol)
    with pytest.raises(CheckpointError, match="refused"):
        Run(data, log_dir).resume(path=evil)
    with pytest.raises(CheckpointError, match="refused"):  # not damaged: a file to look at, not to skip and overwrite
        Run(data, log_dir).resume(auto=True)
    assert run_tool("verify", str(evil)) == 1
    assert not marker.exists()


def test_config_mismatch_names_both_values_and_writes_nothing(data, log_dir):
    Run(data, log_dir).train(0, 2)
    before = {p.name: p.stat().st_mtime_ns for p in log_dir.iterdir()}
    with pytest.raises(CheckpointError, match="n_layer=2 in the checkpoint but 3 in this run"):
        Run(data, log_dir, config={**CONFIG, "n_layer": 3}).resume(path=step_path(log_dir, 1))
    assert {p.name: p.stat().st_mtime_ns for p in log_dir.iterdir()} == before


def test_disk_full_keeps_older_checkpoints_and_says_so(data, log_dir, monkeypatch):
    run = Run(data, log_dir)
    run.train(0, 3)
    before = {p.name: p.read_bytes() for p in log_dir.glob("model_*.pt")}
    calls = []

    def full_disk(obj, f):
        calls.append(1)
        f.write(b"x" * 1000)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", full_disk)
    run.step()
    with pytest.raises(CheckpointError, match="disk is full.*Older checkpoints are untouched"):
        run.save(3)
    monkeypatch.undo()
    assert calls == [1]  # no pointless retries against a full disk
    assert {p.name: p.read_bytes() for p in log_dir.glob("model_*.pt")} == before
    assert read_latest(log_dir) == step_path(log_dir, 2).resolve()
    assert not [p for p in log_dir.iterdir() if ".tmp" in p.name]
    checkpoint.verify_file(step_path(log_dir, 2))


def test_a_transient_write_error_is_retried(data, log_dir, monkeypatch, capsys):
    monkeypatch.setattr(files, "RETRY_WAIT_S", 0.0)
    real_save, calls = torch.save, []

    def flaky(obj, f):
        calls.append(1)
        if len(calls) == 1:
            raise OSError(errno.EIO, "Input/output error")
        real_save(obj, f)

    monkeypatch.setattr(torch, "save", flaky)
    run = Run(data, log_dir)
    run.step()
    run.save(1)
    assert "retrying" in capsys.readouterr().out and len(calls) == 2
    checkpoint.verify_file(step_path(log_dir, 1))


def test_a_save_with_nan_weights_is_refused(data, log_dir):
    run = Run(data, log_dir)
    run.train(0, 2)
    with torch.no_grad():
        run.model.transformer.h[0].mlp.c_fc.weight[0, 0] = float("nan")
    with pytest.raises(CheckpointError, match="NaN or inf after step 2.*last healthy checkpoint is .*model_00001.pt"):
        run.save(2)
    assert names(log_dir) == ["model_00001.pt"]


def test_async_save_writes_the_state_at_save_time_not_later(data, log_dir, monkeypatch):
    run = Run(data, log_dir, checkpoint_interval=0, async_checkpoint=True)
    run.train(0, 2)
    expected = {k: v.clone() for k, v in run.model.state_dict().items()}
    expected_avg = run.optimizer.state[run.model.lm_head.weight]["exp_avg"].clone()
    release, real_save_file = threading.Event(), checkpoint.save_file

    def slow_save_file(obj, path):
        release.wait(10)
        real_save_file(obj, path)

    monkeypatch.setattr(checkpoint_manager, "save_file", slow_save_file)
    run.ckpt.save(2)
    with torch.no_grad():  # training goes on while the writer thread waits
        for p in run.model.parameters():
            p.add_(1.0)
        run.optimizer.state[run.model.lm_head.weight]["exp_avg"].add_(1.0)
    release.set()
    run.ckpt.close()
    saved = load_checkpoint(step_path(log_dir, 2))
    assert all(torch.equal(saved["model"][k], v) for k, v in expected.items())
    tied_index = [i for i, p in enumerate(run.optimizer.param_groups[0]["params"])][0]
    assert torch.equal(saved["optimizer"]["state"][tied_index]["exp_avg"], expected_avg)
    wte, lm_head = saved["model"]["transformer.wte.weight"], saved["model"]["lm_head.weight"]
    assert wte.untyped_storage().data_ptr() == lm_head.untyped_storage().data_ptr()  # still tied: stored once


def test_async_and_sync_checkpoints_hold_the_same_bytes_of_tensors(data, log_dir):
    sync, background = Run(data, log_dir / "sync"), Run(data, log_dir / "async", async_checkpoint=True)
    sync.train(0, 3), background.train(0, 3)
    a, b = load_checkpoint(step_path(log_dir / "sync", 2)), load_checkpoint(step_path(log_dir / "async", 2))
    assert tool.tensor_stats(a) == tool.tensor_stats(b)
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert background.ckpt.last_save_stall_s is not None


def test_rng_states_round_trip_through_a_weights_only_file(tmp_path):
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    checkpoint.save_file({"rng": run_state.capture_rng_state()}, tmp_path / "rng.pt")
    draw = lambda: (random.random(), np.random.rand(3).tolist(), np.random.normal(), torch.rand(3).tolist())  # noqa: E731
    expected = draw()
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    run_state.restore_rng_state(load_checkpoint(tmp_path / "rng.pt")["rng"])
    assert draw() == expected


def test_grad_scaler_state_round_trips(data, log_dir):
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)
    scaler.scale(torch.ones(()))  # the scale exists from the first scaled loss on
    scaler.update(new_scale=256.0)  # as after a few overflows in fp16 training
    Run(data, log_dir, scaler=scaler).train(0, 2)
    fresh = torch.amp.GradScaler("cpu", init_scale=2.0**16)
    Run(data, log_dir, scaler=fresh).resume(auto=True)
    assert fresh.get_scale() == 256.0


def test_stale_temp_files_of_killed_writers_are_removed(data, log_dir):
    log_dir.mkdir()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = log_dir / f".model_00005.pt.tmp{int(dead.stdout)}"
    live = log_dir / f".model_00006.pt.tmp{os.getppid()}"
    stale.write_bytes(b"torn"), live.write_bytes(b"being written")
    Run(data, log_dir)
    assert not stale.exists() and live.exists()


# -----------------------------------------------------------------------------
# Tools: python checkpoint.py inspect | verify | export, and load_model (list, compare, prune: test_checkpoint_tools.py)


def test_inspect_prints_what_a_checkpoint_holds(data, log_dir, capsys):
    Run(data, log_dir).train(0, 3, val_losses=[3.0, 2.5, 2.75])
    assert run_tool("inspect", str(step_path(log_dir, 2))) == 0
    out = capsys.readouterr().out
    for expected in (f"format version  {checkpoint.FORMAT_VERSION}", f"torch version   {torch.__version__}", "step            2",
                     '"n_layer": 2', '"max_steps": 100', "val loss        2.75", "best val loss   2.5",
                     '"position": 96', "3 train losses, 3 val losses", "optimizer       "):
        assert expected in out
    step_path(log_dir, 1).write_bytes(b"garbage")
    assert run_tool("inspect", str(step_path(log_dir, 1))) == 1


def test_verify_passes_good_files_and_fails_on_any_corrupt_one(data, log_dir, capsys):
    Run(data, log_dir).train(0, 4, val_losses=[3.0, 2.5, 2.75, 2.0])
    assert run_tool("verify", str(log_dir)) == 0
    assert capsys.readouterr().out.count("ok   ") == 4  # model_00001..3 and best_model.pt
    flipped = bytearray(step_path(log_dir, 2).read_bytes())
    flipped[len(flipped) // 2] ^= 0x01
    step_path(log_dir, 2).write_bytes(bytes(flipped))
    assert run_tool("verify", str(step_path(log_dir, 2))) == 1
    assert run_tool("verify", str(log_dir)) == 1
    out = capsys.readouterr().out
    assert "BAD  " + str(step_path(log_dir, 2)) in out and "ok   " + str(step_path(log_dir, 3)) in out
    assert run_tool("verify", str(log_dir / "missing.pt")) == 2


def test_verify_checks_shapes_against_the_stored_config(data, log_dir):
    Run(data, log_dir).train(0, 2)
    ckpt = load_checkpoint(step_path(log_dir, 1))
    ckpt["model_config"] = {**ckpt["model_config"], "n_embd": 64}
    torch.save(ckpt, log_dir / "model_00009.pt")
    with pytest.raises(CheckpointError, match=r"transformer.wte.weight has shape \(96, 32\), expected \(96, 64\)"):
        checkpoint.verify_file(log_dir / "model_00009.pt")


def test_the_command_line_exit_codes(data, log_dir, tmp_path, capsys):
    Run(data, log_dir).train(0, 2)
    command = [sys.executable, checkpoint.__file__]  # the documented entry point, forwarded to the tool
    assert subprocess.run(command + ["verify", str(log_dir)], capture_output=True).returncode == 0
    step_path(log_dir, 1).write_bytes(step_path(log_dir, 1).read_bytes()[:5000])
    result = subprocess.run(command + ["verify", str(log_dir)], capture_output=True, text=True)
    assert result.returncode == 1 and "BAD" in result.stdout
    for args in (["inspect", tmp_path / "nope.pt"], ["export", tmp_path / "nope.pt", "--out", tmp_path / "w.pt"]):
        assert run_tool(*args) == 2  # a missing path is a usage error
    assert "does not exist" in capsys.readouterr().err
    assert run_tool("frobnicate") == 2


def logits_of(model):
    idx = torch.arange(T).remainder(CONFIG["vocab_size"]).unsqueeze(0)
    with torch.no_grad():
        return model(idx)[0]


def test_export_round_trips_the_logits(data, log_dir, tmp_path, capsys):
    run = Run(data, log_dir)
    run.train(0, 3)
    run.model.eval()
    expected = logits_of(run.model)
    for name, dtype in (("w.pt", "fp32"), ("w16.pt", "bf16")):
        assert run_tool("export", str(step_path(log_dir, 2)), "--out", str(tmp_path / name), "--dtype", dtype) == 0
    exported = load_checkpoint(tmp_path / "w.pt")
    assert set(exported) >= {"model", "model_config"} and "optimizer" not in exported
    assert exported["model"]["lm_head.weight"].untyped_storage().data_ptr() == \
        exported["model"]["transformer.wte.weight"].untyped_storage().data_ptr()
    assert (tmp_path / "w16.pt").stat().st_size < 0.6 * (tmp_path / "w.pt").stat().st_size
    for path in (step_path(log_dir, 2), tmp_path / "w.pt"):
        model, config = checkpoint.load_model(path)
        assert config == vars(GPTConfig(**CONFIG)) and not model.training and torch.equal(logits_of(model), expected)
    model, _ = checkpoint.load_model(tmp_path / "w16.pt")
    assert torch.allclose(logits_of(model), expected, atol=0.05)
    assert run_tool("verify", str(tmp_path / "w16.pt")) == 0
    with pytest.raises(CheckpointError, match="is an export"):
        Run(data, log_dir).resume(path=tmp_path / "w.pt")
    assert run_tool("export", str(step_path(log_dir, 2)), "--out", str(tmp_path / "w.txt")) == 2


def test_export_to_safetensors_drops_the_tied_copy_and_round_trips(data, log_dir, tmp_path):
    pytest.importorskip("safetensors")
    from safetensors import safe_open

    run = Run(data, log_dir)
    run.train(0, 2)
    run.model.eval()
    out = tmp_path / "w.safetensors"
    assert run_tool("export", str(step_path(log_dir, 1)), "--out", str(out)) == 0
    with safe_open(str(out), framework="pt") as f:
        assert "lm_head.weight" not in f.keys() and "transformer.wte.weight" in f.keys()
        assert '"lm_head.weight": "transformer.wte.weight"' in f.metadata()["tied"]
    model, config = checkpoint.load_model(out)
    assert config == vars(GPTConfig(**CONFIG)) and torch.equal(logits_of(model), logits_of(run.model))
    assert run_tool("verify", str(out)) == 0


def test_export_to_safetensors_without_the_package_says_how_to_install_it(data, log_dir, tmp_path, monkeypatch, capsys):
    Run(data, log_dir).train(0, 2)
    monkeypatch.setitem(sys.modules, "safetensors", None)
    monkeypatch.setitem(sys.modules, "safetensors.torch", None)
    assert run_tool("export", str(step_path(log_dir, 1)), "--out", str(tmp_path / "w.safetensors")) == 2
    assert "pip install safetensors" in capsys.readouterr().err


def test_rng_state_of_a_cuda_or_mps_run_restores_on_a_cpu_machine(tmp_path):
    """A checkpoint from a GPU run carries CUDA / MPS generator states; on a machine without that
    device they are skipped and the CPU streams still continue exactly."""
    torch.manual_seed(3)
    state = run_state.capture_rng_state()
    state["cuda"] = [torch.zeros(16, dtype=torch.uint8), torch.ones(16, dtype=torch.uint8)]
    state["mps"] = torch.zeros(16, dtype=torch.uint8)
    checkpoint.save_file({"rng": state}, tmp_path / "gpu_rng.pt")
    expected = torch.rand(3).tolist()
    torch.manual_seed(9)
    skipped = run_state.restore_rng_state(load_checkpoint(tmp_path / "gpu_rng.pt")["rng"])
    assert torch.rand(3).tolist() == expected
    expected_skips = [name for name, here in (("cuda", torch.cuda.is_available()),
                                              ("mps", torch.backends.mps.is_available())) if not here]
    assert skipped == expected_skips


def older_format(ckpt, version):
    """ckpt as format `version` wrote it. 2: the TrainState spread over the top level. 1 (before model.py), also:
    run_args instead of run_config, and a model_config without real_vocab_size and gelu, whose defaults are what
    that code computed."""
    ckpt = dict(ckpt)
    ckpt.update(ckpt.pop("train_state"))
    ckpt["format_version"] = version
    if version == 1:
        ckpt["run_args"] = ckpt.pop("run_config")
        ckpt["model_config"] = {k: v for k, v in ckpt["model_config"].items() if k not in ("real_vocab_size", "gelu")}
    return ckpt


@pytest.mark.parametrize("version", [1, 2])
def test_a_checkpoint_of_an_older_format_resumes_exactly(data, log_dir, tmp_path, version):
    expected = Run(data, log_dir, checkpoint_interval=3).train(0, 6)
    old = tmp_path / "old" / "model_00003.pt"
    old.parent.mkdir()
    torch.save(older_format(load_checkpoint(step_path(log_dir, 3)), version), old)
    resumed = Run(data, tmp_path / "new", seed=123)
    assert resumed.resume(path=old) == 4
    assert [resumed.step() for _ in range(2)] == [expected[4], expected[5]]
    assert run_tool("verify", old) == 0


def test_a_resume_reads_and_verifies_the_chosen_file_once(data, log_dir, monkeypatch):
    """For an 18.7 GB gpt2-xl checkpoint each pass is minutes: one CRC pass, one (memory-mapped) load, and
    best_model.pt's validation loss without reading its tensors."""
    Run(data, log_dir).train(0, 3, val_losses=[3.0, 2.5, 2.75])
    loads, crc_checks = [], []
    real_load, real_crc = torch.load, checkpoint.check_zip_crc
    monkeypatch.setattr(torch, "load", lambda path, **kw: loads.append((Path(path).name, kw["mmap"]))
                        or real_load(path, **kw))
    monkeypatch.setattr(run_folder, "check_zip_crc", lambda path: crc_checks.append(Path(path).name) or real_crc(path))
    run = Run(data, log_dir)
    assert run.resume(auto=True) == 3
    assert loads == [("model_00002.pt", True)] and crc_checks == ["model_00002.pt"]
    loads.clear()
    assert run.ckpt.best_val_loss_on_disk() == 2.5
    assert loads == [("best_model.pt", True)] and crc_checks == ["model_00002.pt"]  # mapped, not read, not checked
