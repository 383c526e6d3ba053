"""metrics.py: step records, the MFU formula, the step timer's split, plain lines or a bar, TensorBoard."""
import io
import json
import sys

import pytest

import metrics
from metrics import Metrics, StepTimer, Throughput


class FakeTerminal(io.StringIO):
    def isatty(self):
        return True


def read_records(log_dir):
    return [json.loads(line) for line in (log_dir / "metrics.jsonl").read_text().splitlines()]


def test_step_records_hold_throughput_mfu_and_any_extra_keys(tmp_path):
    out = io.StringIO()
    m = Metrics(tmp_path, Throughput(tokens_per_step=1000, flops_per_token=1e8, peak_flops=1e12, world_size=2),
                total_steps=3, stream=out)
    m.log_step(0, 0.5, loss=4.0, lr=1e-3, norm=0.5, mem_alloc_gib=1.25, mem_peak_gib=2.5, grad_scale=1024.0)
    m.log(0, val_loss=3.5)
    m.log(0, hellaswag_acc=0.25, hellaswag_acc_norm=0.5, hellaswag_n=12)
    m.close()
    step, val, hellaswag = read_records(tmp_path)
    assert step["step"] == 0 and step["loss"] == 4.0 and step["lr"] == 1e-3 and step["norm"] == 0.5
    assert step["dt_ms"] == pytest.approx(500) and step["tok_per_sec"] == pytest.approx(2000)
    # 1e8 FLOPs/token * 1000 tokens in 0.5 s on 2 devices of 1e12 FLOP/s each: 10%
    assert step["mfu"] == pytest.approx(0.1)
    assert step["mem_alloc_gib"] == 1.25 and step["mem_peak_gib"] == 2.5 and step["grad_scale"] == 1024.0
    assert val == {"step": 0, "val_loss": 3.5}
    assert hellaswag == {"step": 0, "hellaswag_acc": 0.25, "hellaswag_acc_norm": 0.5, "hellaswag_n": 12}
    printed = out.getvalue()
    assert "MFU 10.0%" in printed and "| mem alloc/peak 1.2/2.5 GiB | rss " in printed
    assert f"| rss {step['mem_rss_gib']:.2f} GiB | grad_scale 1024.0000\n" in printed  # the host's memory apart
    assert "step     0 | val loss 3.5000" in printed and "hellaswag acc norm 0.5000" in printed


def test_no_mfu_when_the_peak_is_unknown(tmp_path):
    m = Metrics(tmp_path, Throughput(tokens_per_step=1000, flops_per_token=1e6, peak_flops=None), total_steps=1,
                stream=io.StringIO())
    record = m.log_step(0, 0.5, loss=4.0, lr=1e-3, norm=0.5)
    m.close()
    assert "mfu" not in record and "mfu" not in read_records(tmp_path)[0]
    assert metrics.mfu(1e6, 1000, 0.5, None) is None


def test_a_disabled_rank_writes_and_prints_nothing(tmp_path):
    out = io.StringIO()
    m = Metrics(tmp_path / "log", enabled=False, total_steps=2, stream=out, throughput=Throughput(tokens_per_step=10))
    m.timer.start()
    m.timer.mark("data")
    m.log_step(0, 0.1, loss=1.0, lr=1.0, norm=1.0)
    m.log(0, val_loss=1.0)
    m.close()
    assert not (tmp_path / "log").exists() and out.getvalue() == ""


class FakeClock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def test_step_timer_splits_each_step_into_data_fwd_bwd_and_optim(monkeypatch):
    clock = FakeClock()
    monkeypatch.setattr(metrics.time, "perf_counter", clock)
    timer = StepTimer("cpu")
    for _ in range(2):  # two steps of two micro steps each
        timer.start()
        for data_s, forward_s, backward_s in ((0.001, 0.010, 0.020), (0.002, 0.020, 0.040)):
            for phase, seconds in (("data", data_s), ("fwd", forward_s), ("bwd", backward_s)):
                clock.now += seconds
                timer.mark(phase)
        clock.now += 0.005
        timer.mark("optim")
        clock.now += 1.0  # logging, evaluation: between steps, not part of any phase
    report = timer.report()
    assert report == pytest.approx({"data_ms": 3.0, "fwd_ms": 30.0, "bwd_ms": 60.0, "optim_ms": 5.0})  # per step
    assert timer.report() == {}  # reset after each report


def test_step_timer_on_cuda_waits_only_at_the_report_and_reuses_its_events(monkeypatch):
    """The GPU path without a GPU: events stand in for torch.cuda.Event. Marking a step must never wait
    for the device (that would stall the host every step); only report() reads the events."""
    import torch

    clock = FakeClock()
    created, waits = [], []

    class FakeEvent:
        def __init__(self, enable_timing=False):
            assert enable_timing
            created.append(self)

        def record(self):
            self.at = clock.now

        def elapsed_time(self, end):
            return (end.at - self.at) * 1000

        def synchronize(self):
            waits.append(self)

    monkeypatch.setattr(torch.cuda, "Event", FakeEvent)
    monkeypatch.setattr(metrics.time, "perf_counter", lambda: pytest.fail("the CUDA timer read the host clock"))
    timer = StepTimer("cuda")
    for interval in range(2):
        for _ in range(3):
            timer.start()
            for phase, seconds in (("data", 0.001), ("fwd", 0.004), ("bwd", 0.006), ("optim", 0.002)):
                clock.now += seconds
                timer.mark(phase)
            clock.now += 1.0  # between steps: not counted
        assert len(waits) == interval  # marking the steps waited for nothing
        assert timer.report() == pytest.approx({"data_ms": 1.0, "fwd_ms": 4.0, "bwd_ms": 6.0, "optim_ms": 2.0})
        assert len(waits) == interval + 1  # one wait per report, on the last event
    assert len(created) == 5 * 3  # the second interval reused the first one's events


def test_the_split_joins_the_record_every_log_interval_as_means_over_the_same_steps(tmp_path, monkeypatch):
    """With --log_interval 2 the phases are means over two steps; the step time shown beside them is the
    mean over the same two steps, so they can never add up to more than it (the issue's 161.7 ms step
    with phases of 216 ms: the last step's dt beside the interval's means)."""
    clock = FakeClock()
    monkeypatch.setattr(metrics.time, "perf_counter", clock)
    out = io.StringIO()
    m = Metrics(tmp_path, total_steps=5, log_interval=2, stream=out, throughput=Throughput(tokens_per_step=1000))
    for step, scale in enumerate((1, 3, 1, 3, 2)):  # steps alternately slow and fast
        m.timer.start()
        for phase, seconds in (("data", 0.001), ("fwd", 0.002), ("bwd", 0.004), ("optim", 0.001)):
            clock.now += seconds * scale
            m.timer.mark(phase)
        m.log_step(step, 0.010 * scale, loss=1.0, lr=1.0, norm=1.0)  # 2 ms * scale outside the phases
    m.close()
    records = read_records(tmp_path)
    assert [("data_ms" in r) for r in records] == [True, False, True, False, True]  # steps 0, 2 and the last
    assert [r["mean_dt_ms"] for r in records[::2]] == pytest.approx([10.0, 20.0, 25.0])  # steps 0 / 1-2 / 3-4
    for r in records[::2]:
        assert set(metrics.SPLIT_KEYS) <= set(r)
        assert r["data_ms"] + r["fwd_ms"] + r["bwd_ms"] + r["optim_ms"] == pytest.approx(0.8 * r["mean_dt_ms"])
        assert r["data_share"] == pytest.approx(0.1) and r["compute_share"] == pytest.approx(0.7)
    assert records[1]["dt_ms"] == pytest.approx(30.0) and "mean_dt_ms" not in records[1]  # each step's own dt
    line = out.getvalue().splitlines()[1]  # step 2: the mean of steps 1 and 2, 30 and 10 ms
    assert "| dt 20.0 ms | 50,000 tok/s |" in line
    assert "| data/fwd/bwd/optim 2.0/4.0/8.0/2.0 ms (data 10%, compute 70%)" in line


def test_every_step_record_holds_the_process_memory(tmp_path):
    m = Metrics(tmp_path, total_steps=1, stream=io.StringIO(), throughput=Throughput(tokens_per_step=10))
    ballast = bytearray(64 * 2**20)  # 64 MiB more resident memory
    record = m.log_step(0, 0.01, loss=1.0, lr=1.0, norm=1.0)
    m.close()
    assert 64 / 1024 < record["mem_rss_gib"] <= record["mem_rss_peak_gib"] < 64  # GiB: more than the ballast
    assert read_records(tmp_path)[0]["mem_rss_gib"] == record["mem_rss_gib"]
    assert metrics.tensorboard_tag("mem_rss_gib") == "memory/rss_gib" and metrics.tensorboard_tag("fwd_ms") == "perf/fwd_ms"
    del ballast


def test_plain_lines_when_stdout_is_not_a_terminal(tmp_path):
    out = io.StringIO()
    m = Metrics(tmp_path, total_steps=4, log_interval=2, stream=out, throughput=Throughput(tokens_per_step=10))
    for step in range(4):
        m.log_step(step, 0.01, loss=2.0, lr=1e-3, norm=1.0)
    m.close()
    lines = out.getvalue().splitlines()
    assert [line.split("|")[0].strip() for line in lines] == ["step     0", "step     2", "step     3"]
    assert "\r" not in out.getvalue() and "%|" not in out.getvalue()


def test_a_progress_bar_with_loss_and_tokens_per_second_on_a_terminal(tmp_path):
    out = FakeTerminal()
    m = Metrics(tmp_path, start_step=10, total_steps=14, stream=out, throughput=Throughput(tokens_per_step=1000))
    for step in range(10, 14):
        m.log_step(step, 0.5, loss=2.5, lr=1e-3, norm=1.0)
    m.log(13, val_loss=2.25)
    m.close()
    text = out.getvalue()
    assert "train: 100%|" in text and "14/14" in text  # resumed at step 10 of 14
    assert "loss=2.5000" in text and "tok/s=2,000" in text
    assert "step    13 | val loss 2.2500" in text  # evaluations still get a line of their own
    assert "step    10 | loss" not in text  # the bar replaces the per-step lines
    assert len(read_records(tmp_path)) == 5


def test_missing_tensorboard_is_one_message_naming_the_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # makes the import fail
    with pytest.raises(metrics.MetricsError, match=r"pip install tensorboard"):
        Metrics(tmp_path, total_steps=1, tensorboard=True, stream=io.StringIO())
    # Checked on every rank, so all of them stop instead of rank 0 alone.
    with pytest.raises(metrics.MetricsError):
        Metrics(tmp_path, enabled=False, total_steps=1, tensorboard=True)


def test_tensorboard_gets_the_same_scalars(tmp_path):
    pytest.importorskip("tensorboard", reason="tensorboard is optional (pip install tensorboard); not installed here")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    m = Metrics(tmp_path, total_steps=3, tensorboard=True, stream=io.StringIO(), throughput=Throughput(tokens_per_step=10))
    for step in range(3):
        m.log_step(step, 0.1, loss=3.0 - step, lr=1e-3, norm=1.0)
    m.log(2, val_loss=1.5, hellaswag_acc_norm=0.25)
    m.close()
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    scalars = events.Tags()["scalars"]
    assert {"train/loss", "train/lr", "perf/tok_per_sec", "val/loss", "hellaswag/acc_norm"} <= set(scalars)
    assert [(e.step, e.value) for e in events.Scalars("train/loss")] == [(0, 3.0), (1, 2.0), (2, 1.0)]
    assert [(e.step, e.value) for e in events.Scalars("val/loss")] == [(2, 1.5)]
