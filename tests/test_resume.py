"""A resume means the same run: --auto_resume continues the folder's run or stops, never starts over or writes
over another timeline, and keeps the run's own settings. Each refusal is one error line, exits non-zero, and
leaves the bytes of every file that was in the folder in it (moved aside at most)."""
import hashlib
import json
import shutil
import subprocess

import numpy as np
import pytest
import torch

import checkpoint
import train_gpt2
from conftest import read_metrics, run_main, run_train
from foreign_trainers import ForeignGPT, Shape, save_build_nanogpt
from shards import shard_path, write_shard

# One layer, 64 wide, one thread: a step in well under a second, bit-identical losses.
ARGS = ["--model", "d2", "--n_layer", "1", "--n_embd", "64", "--n_head", "2", "--block_size", "32", "--seq_len", "16",
        "--micro_batch_size", "2", "--total_batch_size", "64", "--warmup_steps", "2", "--max_lr", "1e-3",
        "--eval_interval", "4", "--eval_steps", "1", "--max_new_tokens", "2", "--num_samples", "1",
        "--num_threads", "1", "--device", "cpu"]


@pytest.fixture(scope="module")
def data(random_data):
    return random_data


def train(data, log_dir, *extra, args=ARGS):
    return run_main(train_gpt2.main, args + ["--data_root", data, "--log_dir", log_dir, *extra])


def contents(folder):
    """The multiset of every file's bytes under folder (a hash each), wherever in it the file now is; metrics.jsonl,
    which a run appends to, by its first lines (the bytes it had stay its start)."""
    found = []
    for p in folder.rglob("*"):
        if p.is_file() and not p.is_symlink() and p.name != ".train.lock":
            found.append(hashlib.sha256(p.read_bytes()).hexdigest() if p.name != "metrics.jsonl" else p.name)
    return sorted(found)


def refused(capsys, *pieces):
    """The command's stderr is one error line holding every piece, and no traceback."""
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    for piece in pieces:
        assert piece in lines[0], (piece, lines[0])
    return lines[0]


def losses(log_dir):
    return {r["step"]: r["loss"] for r in read_metrics(log_dir) if "loss" in r}


@pytest.fixture(scope="module")
def run_dir(data, tmp_path_factory):
    """A finished run of 10 steps with checkpoints at 3, 6, 9 (the uninterrupted reference, kept read-only)."""
    log_dir = tmp_path_factory.mktemp("run") / "log"
    assert train(data, log_dir, "--max_steps", 10, "--checkpoint_interval", 3) == 0
    return log_dir


def copy_run(run_dir, tmp_path):
    shutil.copytree(run_dir, tmp_path / "log", symlinks=True)
    return tmp_path / "log"


@pytest.mark.parametrize("extra, piece", [
    (["--n_embd", "128"], "--n_embd 128 (the checkpoint has 64)"),
    (["--seq_len", "8"], "--seq_len 8 (the checkpoint has 16)"),
    (["--shuffle"], "--shuffle True (the checkpoint has False)"),
])
def test_auto_resume_with_another_shape_is_refused_and_the_run_stays(data, run_dir, tmp_path, capsys, extra, piece):
    log_dir = copy_run(run_dir, tmp_path)
    before = contents(log_dir)
    assert train(data, log_dir, "--auto_resume", "--max_steps", 12, "--keep_last_n_checkpoints", 1, *extra) == 1
    refused(capsys, piece, "would train another run", "--init_from")
    assert contents(log_dir) == before


@pytest.mark.parametrize("kind", ["build-nanogpt", "newer format", "would run code"])
def test_auto_resume_stops_at_a_file_it_cannot_resume_instead_of_training_over_it(data, tmp_path, capsys, kind):
    log_dir = tmp_path / "log"
    log_dir.mkdir()
    if kind == "build-nanogpt":
        shape = Shape(vocab_size=50304, n_layer=1, n_head=2, n_embd=64, block_size=32, gelu="tanh")
        save_build_nanogpt(ForeignGPT(shape), log_dir / "model_00010.pt", 10, 3.5, tmp_path)
        pieces = ("build-nanogpt checkpoint", "--init_from")
    elif kind == "newer format":
        assert train(data, log_dir, "--max_steps", 2) == 0
        newest = checkpoint.load_checkpoint(log_dir / "model_00001.pt")
        checkpoint.save_file({**newest, "format_version": checkpoint.FORMAT_VERSION + 1}, log_dir / "model_00001.pt")
        pieces = ("newer than this code's", "git pull")
    else:
        torch.save({"model": {}, "run": subprocess.Popen}, log_dir / "model_00003.pt")  # a pickled class: code
        pieces = ("refused to load", "run code")
    capsys.readouterr()
    before = contents(log_dir)
    assert train(data, log_dir, "--auto_resume", "--max_steps", 4) == 1
    refused(capsys, *pieces)
    assert contents(log_dir) == before


def test_a_bare_auto_resume_continues_the_same_run_bit_identically(data, tmp_path):
    """Every setting of a run with non-default data, shape, batch, LR, schedule, clip and seed comes back from
    its checkpoint: `train_gpt2.py --auto_resume --log_dir DIR` and nothing else."""
    own = ["--model", "d2", "--n_layer", "2", "--n_embd", "32", "--n_head", "2", "--block_size", "16", "--seq_len", "8",
           "--micro_batch_size", "2", "--total_batch_size", "32", "--max_lr", "3e-3", "--min_lr", "1e-4",
           "--warmup_steps", "3", "--max_steps", "10", "--grad_clip", "0.5", "--seed", "7", "--eval_interval", "5",
           "--eval_steps", "1", "--checkpoint_interval", "5", "--num_threads", "1", "--device", "cpu",
           "--max_new_tokens", "2", "--num_samples", "1"]
    assert train(data, tmp_path / "whole", args=own) == 0
    assert train(data, tmp_path / "cut", "--max_steps", 6, args=own) == 0  # stopped at step 5, as if killed after it
    for name in ("model_00005.pt", "latest_checkpoint.pt"):
        assert (tmp_path / "cut" / name).exists()
    (tmp_path / "cut" / "model_00005.pt").unlink()  # keep the step-5 checkpoint of the 10-step schedule instead
    shutil.copy(tmp_path / "whole" / "model_00005.pt", tmp_path / "cut" / "model_00005.pt")
    assert run_main(train_gpt2.main, ["--auto_resume", "--log_dir", tmp_path / "cut"]) == 0
    whole, cut = losses(tmp_path / "whole"), losses(tmp_path / "cut")
    assert [cut[step] for step in range(6, 10)] == [whole[step] for step in range(6, 10)]


@pytest.mark.parametrize("optimizer, change, key, value", [
    ("adamw", ["--weight_decay", "0.3"], "weight_decay", 0.3),
    ("muon", ["--muon_momentum", "0.8"], "momentum", 0.8),
    ("muon", ["--muon_weight_decay", "0.01"], "weight_decay", 0.01),
])
def test_a_changed_optimizer_setting_on_resume_is_the_one_the_optimizer_steps_with(data, tmp_path, capsys, optimizer,
                                                                                   change, key, value):
    log_dir = tmp_path / "log"
    assert train(data, log_dir, "--max_steps", 3, "--checkpoint_interval", 2, "--optimizer", optimizer) == 0
    assert train(data, log_dir, "--auto_resume", "--max_steps", 4, *change) == 0
    assert f"resume: {change[0]} {change[1]}, where the checkpoint's run had" in capsys.readouterr().out
    saved = torch.load(log_dir / "model_00003.pt", map_location="cpu", weights_only=False)
    groups = saved["optimizer"]["param_groups"]
    assert any(group.get(key) == value for group in groups), groups  # not the file's, which load_state_dict restores
    assert saved["run_config"][change[0][2:]] == value


def test_a_bare_auto_resume_under_torchrun_continues_a_one_process_run(data, run_dir, tmp_path):
    """Before the checkpoint is read, the quickstart's batch (8 x 64 over 2 ranks, more than its 512 tokens) must
    not refuse the command: the run's own batch (2 x 16 x 2 = 64 tokens) is what counts."""
    log_dir = copy_run(run_dir, tmp_path)
    result = run_train(["--auto_resume", "--log_dir", log_dir, "--max_steps", 11], tmp_path, torchrun_procs=2)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "error" not in result.stderr and "resume: --max_steps 11" in result.stdout
    assert 10 in losses(log_dir) and checkpoint.list_checkpoints(log_dir)[-1][0] == 10


def test_resuming_an_older_checkpoint_moves_the_newer_ones_aside(data, run_dir, tmp_path, capsys):
    log_dir = copy_run(run_dir, tmp_path)
    before = contents(log_dir)
    old_nine = (log_dir / "model_00009.pt").read_bytes()
    assert train(data, log_dir, "--resume_from_checkpoint", log_dir / "model_00003.pt", "--max_steps", 8) == 0
    out = capsys.readouterr().out
    assert "resume: resuming from model_00003.pt, older than the newest: model_00006.pt, model_00009.pt moved into" in out
    aside = next(log_dir.glob("rewound_*"))
    assert (aside / "model_00009.pt").read_bytes() == old_nine and not (log_dir / "model_00009.pt").exists()
    assert set(before) <= set(contents(log_dir))  # every old file's bytes are still in the folder
    assert checkpoint.read_latest(log_dir) == (log_dir / "model_00007.pt").resolve()


def test_a_latest_pointer_outside_the_folder_is_ignored_and_the_other_run_untouched(data, run_dir, tmp_path, capsys):
    victim = copy_run(run_dir, tmp_path / "victim")
    own = tmp_path / "own"
    assert train(data, own, "--max_steps", 4, "--checkpoint_interval", 2) == 0
    (own / checkpoint.LATEST_NAME).unlink()
    (own / checkpoint.LATEST_NAME).write_text(f"{checkpoint.POINTER_MAGIC}../victim/log/model_00009.pt")
    before = contents(victim)
    capsys.readouterr()
    assert train(data, own, "--auto_resume", "--max_steps", 6, "--save_optimizer", "latest") == 0
    out = capsys.readouterr().out
    assert "points outside its folder" in out and "auto-resume: " + str((own / "model_00003.pt").resolve()) in out
    assert contents(victim) == before


def test_a_blow_up_keeps_a_healthy_checkpoint_and_the_next_auto_resume_returns_to_it(data, tmp_path, capsys):
    log_dir = tmp_path / "log"
    rotate = ["--checkpoint_interval", 1, "--keep_last_n_checkpoints", 2, "--warmup_steps", 0]
    assert train(data, log_dir, "--max_steps", 6, *rotate) == 0
    capsys.readouterr()
    assert train(data, log_dir, "--auto_resume", "--max_steps", 30, "--max_lr", 1e3, *rotate) == 1  # blows up
    line = refused(capsys, "The last healthy checkpoint is", "run again with --auto_resume")
    # the loss or the weights, whichever goes non-finite first (it depends on torch's kernels)
    assert "loss is nan" in line or "loss is inf" in line or "NaN or inf" in line, line
    healthy = checkpoint.Path(line.split("The last healthy checkpoint is ")[1].split(":")[0])
    assert healthy.is_file() and healthy.name == "model_00005.pt"  # the step after it still had a sane loss
    exploded = [p for _, p in checkpoint.list_checkpoints(log_dir) if p.name != healthy.name]
    assert exploded, "rotation kept the healthy file beside the newer, exploded one"
    exploded_bytes = [p.read_bytes() for p in exploded]
    assert train(data, log_dir, "--auto_resume", "--max_steps", 12, "--max_lr", 1e-3, *rotate) == 0
    out = capsys.readouterr().out
    assert f"auto-resume: {healthy}, the newest healthy checkpoint before the run diverged" in out
    aside = next(log_dir.glob("diverged_*"))
    assert sorted(p.read_bytes() for p in aside.glob("model_*.pt")) == sorted(exploded_bytes)
    assert np.isfinite(list(losses(log_dir).values())[-1])


def test_a_log_dir_that_is_a_file_or_read_only_is_refused_before_step_0(data, tmp_path, capsys):
    not_a_folder = tmp_path / "log"
    not_a_folder.write_text("notes")
    assert train(data, not_a_folder, "--max_steps", 2) == 1
    refused(capsys, "is a file, not a folder")
    mount = tmp_path / "ro"
    mount.mkdir()
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(mount)], capture_output=True)
    if made.returncode != 0:
        pytest.skip(f"cannot mount a read-only tmpfs here (root needed): {made.stderr.decode().strip()}")
    try:
        assert train(data, mount / "log", "--max_steps", 2) == 1
        refused(capsys, "Read-only file system", "--log_dir")
        assert not (mount / "log").exists()
    finally:
        subprocess.run(["umount", str(mount)], check=True)


def test_save_optimizer_latest_strips_epoch_checkpoints_and_a_damaged_newest_names_the_way_on(data, tmp_path, capsys):
    small = tmp_path / "small"
    rng = np.random.default_rng(0)
    write_shard(shard_path(small, "tiny", "train", 0), rng.integers(0, 50257, 700))  # an epoch every 10 steps
    write_shard(shard_path(small, "tiny", "val", 0), rng.integers(0, 50257, 200))
    log_dir = tmp_path / "log"
    assert train(small, log_dir, "--max_steps", 14, "--checkpoint_interval", 4, "--save_optimizer", "latest") == 0
    files = {p.name: checkpoint.load_checkpoint(p).get("optimizer") is not None for _, p in checkpoint.list_checkpoints(log_dir)}
    assert any("_epoch" in name for name in files) and [name for name, has in files.items() if has] == ["model_00013.pt"]
    (log_dir / "model_00013.pt").write_bytes(b"torn")
    capsys.readouterr()
    assert train(small, log_dir, "--auto_resume", "--max_steps", 16) == 1
    refused(capsys, "holds weights only", "--resume_from_checkpoint", "--reset_optimizer")


def test_the_smaller_resume_cases(data, run_dir, tmp_path, capsys):
    log_dir = copy_run(run_dir, tmp_path)
    # a folder given to --resume_from_checkpoint resumes its newest; a run already at --max_steps trains nothing
    assert train(data, log_dir, "--resume_from_checkpoint", log_dir, "--max_steps", 10) == 0
    assert "already at step 9 of --max_steps 10: nothing to train; raise --max_steps to continue" in \
        capsys.readouterr().out
    # --checkpoint_path alone resumes that file
    assert train(data, log_dir, "--checkpoint_path", log_dir / "model_00009.pt", "--max_steps", 11) == 0
    assert "resumed from" in capsys.readouterr().out
    # other text under the same shard names is refused, naming the difference
    other = tmp_path / "other"
    shutil.copytree(data, other)
    tokens = np.load(shard_path(other, "tiny", "train", 0))
    write_shard(shard_path(other, "tiny", "train", 0), tokens[::-1].copy())
    before = contents(log_dir)
    assert train(other, log_dir, "--auto_resume", "--max_steps", 12) == 0  # given on purpose: read from its start
    assert "is other data than the checkpoint's run read" in capsys.readouterr().out
    assert set(before) <= set(contents(log_dir))


def test_resuming_onto_changed_data_without_saying_so_is_refused(data, tmp_path, capsys):
    own = tmp_path / "data"
    shutil.copytree(data, own)
    log_dir = tmp_path / "log"
    assert train(own, log_dir, "--max_steps", 4, "--checkpoint_interval", 2) == 0
    tokens = np.load(shard_path(own, "tiny", "train", 0))
    write_shard(shard_path(own, "tiny", "train", 0), tokens[::-1].copy())  # prepared again: same names, other text
    capsys.readouterr()
    before = contents(log_dir)
    assert run_main(train_gpt2.main, ["--auto_resume", "--log_dir", log_dir, "--max_steps", 6]) == 1
    refused(capsys, "is not the data the checkpoint's run read", "--data_root")
    assert set(before) <= set(contents(log_dir))
    assert json.loads((log_dir / "metrics.jsonl").read_text().splitlines()[-1])["step"] == 3  # nothing trained
