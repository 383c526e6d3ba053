"""python checkpoint.py list | compare | prune on a tiny GPT's real checkpoints: what a user sees of a run
folder, and that a clean-up keeps what a resume and the best weights need, and never races a trainer."""
import re
import subprocess
import sys
import time

import numpy as np
import pytest

import checkpoint
import files
from checkpoint import load_checkpoint, step_path
from conftest import REPO_ROOT, load_script, run_main
from shards import shard_path, write_shard
from test_checkpoint import CONFIG, Run

tool = load_script("checkpoint_tool.py")


def run_tool(*argv):
    return run_main(tool.main, argv)


@pytest.fixture
def data(tmp_path):
    tokens = np.random.default_rng(0).integers(0, CONFIG["vocab_size"], 20_000)
    write_shard(shard_path(tmp_path / "data", "tiny", "train", 0), tokens)
    return tmp_path / "data"


@pytest.fixture
def short_data(tmp_path):
    """100 tokens: three steps of 2 x 16 a pass, so a few steps cross into the next epoch."""
    tokens = np.random.default_rng(1).integers(0, CONFIG["vocab_size"], 100)
    write_shard(shard_path(tmp_path / "short", "tiny", "train", 0), tokens)
    return tmp_path / "short"


def rows_of(out):
    """{first column: the rest of the row, split} of a table."""
    return {line.split()[0]: line.split()[1:] for line in out.splitlines()[1:] if line.strip()}


def test_list_shows_step_epoch_train_loss_and_the_val_loss_with_its_step(data, tmp_path, capsys):
    log_dir = tmp_path / "log"
    losses = Run(data, log_dir, save_optimizer="latest").train(0, 4, val_losses=[3.0, 2.5, None, None])
    assert run_tool("list", log_dir) == 0
    out = capsys.readouterr().out
    rows = rows_of(out)
    # model_00003.pt: evaluated last at step 1, so its val loss says so; its train loss is step 3's.
    assert rows["model_00003.pt"][:7] == ["3", "0", f"{losses[3]:.4f}", "@", "3", "2.5000", "@"]
    assert rows["model_00003.pt"][7] == "1" and rows["model_00003.pt"][-3:] == ["yes", "<-", "latest"]
    assert rows["model_00001.pt"][:8] == ["1", "0", f"{losses[1]:.4f}", "@", "1", "2.5000", "@", "1"]
    assert rows["model_00001.pt"][-1] == "no"  # --save_optimizer latest stripped it
    assert rows["best_model.pt"][:8] == ["1", "0", f"{losses[1]:.4f}", "@", "1", "2.5000", "@", "1"]
    assert "latest -> model_00003.pt" in out


def test_list_takes_files_and_folders_and_shows_the_epoch_the_data_is_in(data, short_data, tmp_path, capsys):
    run = Run(short_data, tmp_path / "short_run")
    run.train(0, 5)
    epoch = run.loader.epoch
    assert epoch >= 1  # the premise: the 100-token data ran out within the five steps
    other = tmp_path / "other_run"
    Run(data, other).train(0, 2)
    garbage = tmp_path / "notes.pt"
    garbage.write_bytes(b"not a checkpoint")
    assert run_tool("list", tmp_path / "short_run", step_path(other, 1), garbage) == 1  # one unreadable file
    out = capsys.readouterr().out
    rows = rows_of(out)
    assert rows[str(step_path(tmp_path / "short_run", 4))][:2] == ["4", str(epoch)]
    assert rows[str(step_path(tmp_path / "short_run", 1))][:2] == ["1", "0"]
    assert rows[str(step_path(other, 1))][:2] == ["1", "0"] and rows[str(step_path(other, 1))][-2:] == ["<-", "latest"]
    assert rows[str(garbage)][0] == "unreadable:"
    assert f"latest in {tmp_path / 'short_run'} -> model_00004.pt" in out
    assert run_tool("list", tmp_path / "missing") == 2


def test_compare_puts_steps_losses_and_the_settings_that_differ_side_by_side(data, tmp_path, capsys):
    a, b = tmp_path / "a", tmp_path / "b"
    losses_a = Run(data, a).train(0, 3, val_losses=[3.0, 2.5, 2.75])
    Run(data, b, seed=1).train(0, 2, val_losses=[3.5, None])
    changed = load_checkpoint(step_path(b, 1))
    changed["run_config"] = {**changed["run_config"], "max_lr": 1e-3, "seed": 7}
    checkpoint.save_file(changed, step_path(b, 1))
    assert run_tool("compare", a, step_path(b, 1)) == 0  # a folder stands for its latest checkpoint
    out = capsys.readouterr().out.splitlines()
    cells = {row[0]: row[1:] for row in (re.split(r"\s{2,}", line.strip()) for line in out)}  # one space within a cell
    assert cells["file"] == [str(step_path(a, 2)), str(step_path(b, 1))]
    assert cells["step"] == ["2", "1"]
    assert cells["train loss"][0] == f"{losses_a[2]:.4f} @ 2"
    assert cells["val loss"] == ["2.7500 @ 2", "3.5000 @ 0"]
    assert cells["best val loss"] == ["2.5000", "3.5000"]
    assert [line for line in out if "settings differ" in line][0].startswith("2 of ")
    assert cells["max_lr"] == ["-", "0.001"] and cells["seed"] == ["-", "7"]
    assert "max_steps" not in cells and "model.n_layer" not in cells  # the same in both: no row
    assert run_tool("compare", step_path(a, 2)) == 2  # one file is nothing to compare


def names(log_dir):
    return sorted(p.name for p in log_dir.iterdir() if p.name.endswith(".pt"))


def test_prune_keeps_the_newest_n_best_epoch_and_latest(data, tmp_path, capsys):
    log_dir = tmp_path / "log"
    run = Run(data, log_dir)
    run.train(0, 7, val_losses=[3.0, 2.0, 2.5, 2.6, 2.7, 2.8, 2.9])
    run.ckpt.save(3, epoch=1)  # model_00003_epoch1.pt
    run.ckpt.close()
    checkpoint.point_latest(log_dir, step_path(log_dir, 2))  # as after a resume from an older file
    before = names(log_dir)
    assert before == ["best_model.pt", "latest_checkpoint.pt", "model_00001.pt", "model_00002.pt",
                      "model_00003.pt", "model_00003_epoch1.pt", "model_00004.pt", "model_00005.pt", "model_00006.pt"]

    assert run_tool("prune", log_dir, "--keep", "2", "--dry_run") == 0
    out = capsys.readouterr().out.splitlines()
    assert names(log_dir) == before
    assert [line.split()[:3] for line in out if line.startswith("would remove")] == [
        ["would", "remove", str(step_path(log_dir, n))] for n in (1, 3, 4)]

    assert run_tool("prune", log_dir, "--keep", "2") == 0
    out = capsys.readouterr().out.splitlines()
    assert [line.split()[1] for line in out if line.startswith("removed")] == [str(step_path(log_dir, n))
                                                                              for n in (1, 3, 4)]
    assert "kept model_00002.pt, older than the newest 2: latest_checkpoint.pt names it" in out
    assert names(log_dir) == ["best_model.pt", "latest_checkpoint.pt", "model_00002.pt", "model_00003_epoch1.pt",
                              "model_00005.pt", "model_00006.pt"]
    assert Run(data, log_dir).resume(auto=True) == 3  # latest still resumes
    assert run_tool("prune", log_dir, "--keep", "0") == 2


def test_prune_refuses_while_a_trainer_holds_the_folder(data, tmp_path, capsys):
    log_dir = tmp_path / "log"
    Run(data, log_dir).train(0, 4)
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time, files; files.RunLock(sys.argv[1]).acquire(); "
                               "print('held', flush=True); time.sleep(120)", str(log_dir)],
                              cwd=REPO_ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        before = names(log_dir)
        assert run_tool("prune", log_dir, "--keep", "1") == 2
        err = capsys.readouterr().err.splitlines()
        assert len(err) == 1 and err[0].startswith(f"error: {log_dir} is in use by a trainer (pid {holder.pid} on ")
        assert names(log_dir) == before
        assert run_tool("prune", log_dir, "--keep", "1", "--dry_run") == 0  # looking is harmless
        assert "without --dry_run prune refuses until it stops" in capsys.readouterr().out
    finally:
        holder.kill()
        holder.wait()
    time.sleep(0.1)
    assert run_tool("prune", log_dir, "--keep", "1") == 0
    assert names(log_dir) == ["latest_checkpoint.pt", "model_00003.pt"]
    files.RunLock.check(log_dir)  # prune let go of its lock: a trainer may start
