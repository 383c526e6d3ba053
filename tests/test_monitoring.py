"""What a training run shows and records: the step timer's split, plain step lines in logs, HellaSwag
every --hellaswag_interval steps (one process and DDP), and clear errors for missing pieces."""
import os
from pathlib import Path

import pytest

from conftest import TINY_RUN, read_metrics, run_train

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "hellaswag_tiny.jsonl"  # 12 examples
COMMON = TINY_RUN + ["--total_batch_size", 256, "--warmup_steps", 2, "--max_lr", 1e-3, "--eval_interval", 3,
                     "--log_interval", 2, "--hellaswag_file", FIXTURE]


@pytest.fixture(scope="module")
def monitored_run(tiny_data, tmp_path_factory):
    """One tiny run with HellaSwag and a log interval of 2, shared by the tests below."""
    log_dir = tmp_path_factory.mktemp("monitored")
    result = run_train(COMMON + ["--max_steps", 6, "--hellaswag_interval", 3, "--data_root", tiny_data,
                                 "--log_dir", log_dir], cwd=log_dir)
    assert result.returncode == 0, result.stderr
    return result, read_metrics(log_dir)


def test_hellaswag_interval_writes_accuracy_to_metrics_jsonl(monitored_run):
    result, records = monitored_run
    hellaswag = [r for r in records if "hellaswag_acc_norm" in r]
    assert [r["step"] for r in hellaswag] == [0, 3, 5]  # every 3 steps and at the last step
    for r in hellaswag:
        assert set(r) == {"step", "hellaswag_acc", "hellaswag_acc_norm", "hellaswag_n"}
        assert r["hellaswag_n"] == 12 and 0 <= r["hellaswag_acc"] <= 1 and 0 <= r["hellaswag_acc_norm"] <= 1
        assert round(r["hellaswag_acc_norm"] * 12) == pytest.approx(r["hellaswag_acc_norm"] * 12)  # a count of 12
    assert f"step     3 | hellaswag acc {hellaswag[1]['hellaswag_acc']:.4f}" in result.stdout


def test_step_timer_split_is_recorded_every_log_interval_and_adds_up_to_the_step(monitored_run):
    _, records = monitored_run
    steps = [r for r in records if "loss" in r]
    timed = [r["step"] for r in steps if "data_ms" in r]
    assert timed == [0, 2, 4, 5]  # every 2 steps and the last
    since_last_report = []
    for r in steps:
        assert r["mem_rss_gib"] > 0.05 and r["mem_rss_peak_gib"] >= r["mem_rss_gib"]  # a process with torch: > 50 MB
        since_last_report.append(r["dt_ms"])
        if "data_ms" not in r:
            continue
        # The phases and the step time beside them are means over the same steps, those since the last report;
        # they cover each step from zero_grad to the optimizer's update, dt adds get_lr and the loss.item() wait.
        assert r["mean_dt_ms"] == pytest.approx(sum(since_last_report) / len(since_last_report))
        since_last_report = []
        phases = r["data_ms"] + r["fwd_ms"] + r["bwd_ms"] + r["optim_ms"]
        assert min(r["data_ms"], r["fwd_ms"], r["bwd_ms"], r["optim_ms"]) >= 0
        assert r["bwd_ms"] > r["data_ms"] and r["fwd_ms"] > r["data_ms"]  # passes of the model cost more than a memmap slice
        assert 0.5 * r["mean_dt_ms"] <= phases <= r["mean_dt_ms"], r  # never more than the step
        assert r["data_share"] == pytest.approx(r["data_ms"] / r["mean_dt_ms"])
        assert r["compute_share"] == pytest.approx((phases - r["data_ms"]) / r["mean_dt_ms"])
        assert r["data_share"] + r["compute_share"] <= 1


def test_plain_step_lines_when_stdout_is_not_a_terminal(monitored_run):
    result, _ = monitored_run
    lines = [line for line in result.stdout.splitlines() if "| loss " in line]
    assert [line.split("|")[0].strip() for line in lines] == ["step     0", "step     2", "step     4", "step     5"]
    assert "data/fwd/bwd/optim" in lines[0] and ", compute " in lines[0]
    assert " | rss " in lines[0]
    assert "\r" not in result.stdout and "%|" not in result.stdout + result.stderr  # no progress bar in a log file


def test_hellaswag_under_ddp_counts_the_examples_of_every_rank(tiny_data, tmp_path, monitored_run):
    """Two ranks score 6 examples each; the record says 12 and matches the one-process run."""
    result = run_train(COMMON + ["--max_steps", 1, "--hellaswag_interval", 1, "--data_root", tiny_data,
                                 "--log_dir", tmp_path], cwd=tmp_path, torchrun_procs=2)
    assert result.returncode == 0, result.stderr
    records = [r for r in read_metrics(tmp_path) if "hellaswag_n" in r]
    single = next(r for r in monitored_run[1] if "hellaswag_n" in r)  # step 0 of the same model and data
    assert len(records) == 1 and records[0]["hellaswag_n"] == 12
    assert records[0]["hellaswag_acc_norm"] == pytest.approx(single["hellaswag_acc_norm"])
    assert result.stdout.count("| hellaswag n 12") == 1  # only rank 0 prints


@pytest.mark.parametrize("package", ["tensorboard", "wandb"])
def test_a_missing_logging_package_stops_before_training_with_the_install_command(tiny_data, tmp_path, package):
    fake = tmp_path / "fake_site" / package  # an uninstalled package, even where it is installed
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text(f"raise ModuleNotFoundError(\"No module named '{package}'\")\n")
    pythonpath = os.pathsep.join(filter(None, [str(fake.parent), os.environ.get("PYTHONPATH")]))
    result = run_train(TINY_RUN + ["--data_root", tiny_data, "--log_dir", tmp_path / "log", "--max_steps", 2,
                                   f"--{package}"], cwd=tmp_path, env_extra={"PYTHONPATH": pythonpath})
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1].startswith(f"error: --{package} needs the {package} package")
    assert f"pip install {package}" in result.stderr and "Traceback" not in result.stderr
    assert "| loss " not in result.stdout and not list((tmp_path / "log").glob("model_*.pt"))  # no step ran


def test_missing_hellaswag_file_is_one_message_before_training(tiny_data, tmp_path):
    missing = tmp_path / "nope.jsonl"
    result = run_train(TINY_RUN + ["--data_root", tiny_data, "--log_dir", tmp_path / "log", "--max_steps", 2,
                                   "--hellaswag_interval", 1, "--hellaswag_file", missing], cwd=tmp_path)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.startswith("error: cannot read HellaSwag data") and str(missing) in result.stderr
    assert "| loss " not in result.stdout


def test_wandb_offline_keeps_one_tracked_run_through_kill_9_and_auto_resume(tiny_data, tmp_path, monkeypatch, capsys):
    pytest.importorskip("wandb", reason="wandb is optional (pip install wandb; CI installs it)")
    import signal
    import subprocess
    import sys
    import time

    import checkpoint
    import train_gpt2
    from conftest import REPO_ROOT

    log_dir = tmp_path / "log"
    env = dict(os.environ, WANDB_MODE="offline", WANDB_SILENT="true", OMP_NUM_THREADS="1")
    command = [sys.executable, str(REPO_ROOT / "train_gpt2.py"), *map(str, TINY_RUN), "--data_root", str(tiny_data),
               "--log_dir", str(log_dir), "--total_batch_size", "128", "--checkpoint_interval", "1", "--wandb",
               "--wandb_project", "tests", "--auto_resume"]
    first = subprocess.Popen(command + ["--max_steps", "200"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             text=True, env=env, cwd=tmp_path)
    deadline = time.monotonic() + 120
    while not (log_dir / "model_00002.pt").exists():
        assert first.poll() is None and time.monotonic() < deadline, first.stdout.read()
        time.sleep(0.05)
    first.send_signal(signal.SIGKILL)
    first.wait()
    run_id = checkpoint.load_checkpoint(checkpoint.read_latest(log_dir))["tracking"]["wandb_run_id"]
    assert run_id and len(run_id) >= 8
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    train_gpt2.main(command[2:] + ["--max_steps", "6"])  # the resume, in this process
    assert f"wandb: continuing run {run_id} (log) in project tests (offline" in capsys.readouterr().out
    runs = sorted(p.name for p in (log_dir / "wandb").glob("offline-run-*"))
    assert len(runs) == 2 and all(name.endswith(run_id) for name in runs), runs  # before and after the kill: one id
    assert checkpoint.load_checkpoint(log_dir / "model_00005.pt")["tracking"]["wandb_run_id"] == run_id
