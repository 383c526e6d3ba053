"""Devices as users meet them: which device is picked, what a missing one says, presets that
never beat a flag, compile that falls back instead of failing, micro batches sized to memory,
and out-of-memory errors that name the fix. CUDA and MPS are mocked: these run on a CPU."""
import contextlib
import json
import os
import signal
import subprocess
import sys

import pytest
import torch
import torch.nn as nn

import device as device_mod
import train_gpt2
from conftest import REPO_ROOT, TINY_RUN, read_metrics, run_ranks, run_train
from train_gpt2 import parse_args


def set_available(monkeypatch, cuda, mps):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: mps)


# -----------------------------------------------------------------------------
# Selection


@pytest.mark.parametrize("cuda, mps, expected", [
    (True, True, "cuda"), (True, False, "cuda"), (False, True, "mps"), (False, False, "cpu"),
])
def test_auto_picks_cuda_then_mps_then_cpu(monkeypatch, cuda, mps, expected):
    set_available(monkeypatch, cuda, mps)
    assert device_mod.select_device("auto") == expected


def test_an_explicit_device_wins_over_auto(monkeypatch):
    set_available(monkeypatch, cuda=True, mps=True)
    assert device_mod.select_device("mps") == "mps"
    assert device_mod.select_device("cpu") == "cpu"


@pytest.mark.parametrize("requested, built, expected", [
    ("cuda", False, "built without CUDA"), ("cuda", True, "CUDA_VISIBLE_DEVICES"),
    ("mps", False, "built without MPS"), ("mps", True, "not an Apple-silicon Mac"),
])
def test_missing_device_names_the_checks(monkeypatch, requested, built, expected):
    set_available(monkeypatch, cuda=False, mps=False)
    monkeypatch.setattr(getattr(torch.backends, requested), "is_built", lambda: built)
    with pytest.raises(device_mod.DeviceError) as err:
        device_mod.select_device(requested)
    assert expected in str(err.value) and "--device auto" in str(err.value)


def test_more_processes_than_gpus_is_an_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(device_mod.DeviceError, match="nproc_per_node 2"):
        device_mod.torch_device("cuda", local_rank=2)


def test_environment_is_set_before_torch_loads_unless_the_user_set_it():
    # torch 2.9 renamed the allocator variable; device.py sets the name this torch reads.
    alloc = "PYTORCH_ALLOC_CONF" if tuple(map(int, torch.__version__.split(".")[:2])) >= (2, 9) else "PYTORCH_CUDA_ALLOC_CONF"
    code = (f"import os, environment; print(os.environ.get('{alloc}'), os.environ['PYTORCH_ENABLE_MPS_FALLBACK'], "
            "os.environ['PYTORCH_MPS_HIGH_WATERMARK_RATIO'], os.environ['PYTORCH_MPS_LOW_WATERMARK_RATIO']); "
            "print(environment.LINES['cuda'][0])")
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTORCH_")}
    fresh = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, env=env, capture_output=True, text=True)
    assert fresh.returncode == 0, fresh.stderr
    # MPS refuses to start if the low mark is above the high one (its default low mark is 1.4 on Apple silicon).
    assert fresh.stdout.splitlines()[0] == "expandable_segments:True 1 1.0 0.8"
    assert f"cuda: {alloc}=expandable_segments:True" in fresh.stdout
    env["PYTORCH_CUDA_ALLOC_CONF"] = "max_split_size_mb:128"  # the old name, set by the user, is kept and not overridden
    theirs = subprocess.run([sys.executable, "-c", code.replace(alloc, "PYTORCH_CUDA_ALLOC_CONF")], cwd=REPO_ROOT, env=env,
                            capture_output=True, text=True)
    assert theirs.stdout.splitlines()[0].startswith("max_split_size_mb:128 ")
    assert "cuda: PYTORCH_CUDA_ALLOC_CONF=max_split_size_mb:128 (from your environment)" in theirs.stdout
    assert "PYTORCH_ALLOC_CONF" not in theirs.stdout.replace("PYTORCH_CUDA_ALLOC_CONF", "")


def test_mps_memory_fraction_is_applied_checked_or_ignored(monkeypatch):
    calls = []
    monkeypatch.setattr(torch.mps, "set_per_process_memory_fraction", calls.append)
    monkeypatch.setattr(torch.mps, "recommended_max_memory", lambda: 16 * 2**30)
    lines = device_mod.apply_device_settings("mps", mps_memory_fraction=0.5)
    assert calls == [0.5] and any("8.0 GiB" in line for line in lines)
    with pytest.raises(device_mod.DeviceError, match="outside 0..2"):
        device_mod.apply_device_settings("mps", mps_memory_fraction=3)
    assert any("ignored: training on cpu" in line for line in device_mod.apply_device_settings("cpu", mps_memory_fraction=0.5))
    assert calls == [0.5]


def test_device_report_runs_and_says_what_it_would_use():
    result = subprocess.run([sys.executable, "device.py"], cwd=REPO_ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    for text in ("torch " + torch.__version__, "CUDA: built", "cuDNN", "GPUs visible", "MPS: built", "would train on:",
                 "preset", "compile"):
        assert text in result.stdout
    if not torch.cuda.is_available():
        missing = subprocess.run([sys.executable, "device.py", "--device", "cuda"], cwd=REPO_ROOT, capture_output=True, text=True)
        assert missing.returncode == 1 and "nvidia-smi" in missing.stderr and "Traceback" not in missing.stderr


# -----------------------------------------------------------------------------
# torch.compile fallback


class TinyLM(nn.Module):
    """model(x, y) -> (logits, loss), like GPT, in a few parameters."""

    def __init__(self, oom_above=None):
        super().__init__()
        self.emb = nn.Embedding(50257, 8)
        self.oom_above = oom_above

    def forward(self, idx, targets):
        if self.oom_above is not None and idx.size(0) > self.oom_above:
            raise torch.OutOfMemoryError(f"CUDA out of memory. Tried to allocate {idx.size(0)} GiB")
        logits = self.emb(idx) @ self.emb.weight.T
        return logits, nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten())


def trial(model):
    device_mod.forward_backward(model, 2, 4, torch.device("cpu"), "fp32")


def test_compile_chain_per_mode():
    assert device_mod.compile_chain("max-autotune") == ["max-autotune", "default", "eager"]
    assert device_mod.compile_chain("default") == ["default", "eager"]
    assert device_mod.compile_chain("none") == ["eager"]
    with pytest.raises(device_mod.DeviceError, match="unknown --compile mode 'fast'"):
        device_mod.compile_chain("fast")


def test_the_trial_pass_does_not_sync_gradients_across_ranks():
    # Under DDP a rank whose compile failed never reaches backward: a gradient all-reduce in the
    # trial would hang the others, so forward and backward run inside DDP's no_sync().
    class DDPLike(TinyLM):
        def __init__(self):
            super().__init__()
            self.syncing, self.seen = True, []
            self.emb.weight.register_hook(lambda grad: self.seen.append(("backward", self.syncing)))

        @contextlib.contextmanager
        def no_sync(self):
            self.syncing = False
            try:
                yield
            finally:
                self.syncing = True

        def forward(self, idx, targets):
            self.seen.append(("forward", self.syncing))
            return super().forward(idx, targets)

    model = DDPLike()
    trial(model)
    assert model.seen == [("forward", False), ("backward", False)]


def test_compile_that_raises_falls_back_to_eager(monkeypatch, capsys):
    def broken_compile(model, mode=None):
        raise RuntimeError(f"no C++ compiler for mode {mode}\nlong inductor trace")

    monkeypatch.setattr(torch, "compile", broken_compile)
    model = TinyLM()
    used, mode = device_mod.compile_model(model, "cpu", "max-autotune", trial=trial)
    assert used is model and mode == "eager"
    out = capsys.readouterr().out.splitlines()
    assert out == ["compile: mode max-autotune failed on cpu (RuntimeError: no C++ compiler for mode max-autotune); using default",
                   "compile: mode default failed on cpu (RuntimeError: no C++ compiler for mode None); using eager"]


class FailsOnFirstCall(nn.Module):
    """What a lazily compiled model does when the backend cannot handle it: compiles 'fine', fails when called."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, *args):
        raise RuntimeError("BackendCompilerFailed: triton not found")


def test_compile_that_fails_at_the_first_call_falls_back(monkeypatch, capsys):
    # max-autotune fails when called; default works (here: the model itself, as eager would).
    monkeypatch.setattr(torch, "compile", lambda model, mode=None: FailsOnFirstCall(model) if mode else model)
    model = TinyLM()
    used, mode = device_mod.compile_model(model, "cuda", "max-autotune", trial=trial)
    assert mode == "default" and used is model
    out = capsys.readouterr().out
    assert "compile: mode max-autotune failed on cuda (RuntimeError: BackendCompilerFailed: triton not found); using default" in out
    assert "compile: mode default compiled and checked on one micro batch" in out
    assert all(p.grad is None for p in model.parameters())  # the trial's gradients do not leak into step 0


def test_training_goes_on_eager_when_compile_fails_at_the_first_step(tiny_data, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(torch, "compile", lambda model, mode=None: FailsOnFirstCall(model))
    monkeypatch.setattr(signal, "signal", lambda *a: None)  # the trainer's handlers must not outlive this test
    train_gpt2.main(TINY_RUN + ["--data_root", str(tiny_data), "--log_dir", str(tmp_path), "--total_batch_size", "128",
                                "--max_steps", "2", "--compile", "reduce-overhead"])
    out = capsys.readouterr().out
    assert "compile: mode reduce-overhead failed on cpu (RuntimeError: BackendCompilerFailed: triton not found); using default" in out
    assert "compile: mode default failed on cpu" in out and "using eager" in out
    assert [r["step"] for r in read_metrics(tmp_path) if "loss" in r] == [0, 1]


def test_running_out_of_memory_in_the_compile_trial_is_not_a_compile_failure(monkeypatch):
    monkeypatch.setattr(torch, "compile", lambda model, mode=None: model)
    with pytest.raises(torch.OutOfMemoryError):
        device_mod.compile_model(TinyLM(oom_above=1), "cuda", "default", trial=trial)


@pytest.mark.parametrize("fails_in", ["compile", "trial"])
def test_ranks_agree_on_the_compile_mode_and_the_micro_batch(tmp_path, fails_in):
    """Two gloo ranks under torchrun, the model wrapped in DDP as training wraps it: compile (or the
    trial step) fails on rank 1 only, so both run eager, and neither waits in DDP's constructor for
    the other; and the micro batch every rank uses is the smallest any rank found."""
    proc = run_ranks("agree_compile.py", fails_in, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert results == [{"mode": "eager", "ddp": True, "min": 10, "max": 11, "from_rank0": "rank 0"}] * 2
    assert proc.stdout.count("compile: mode default failed on cpu (it failed on another rank); using eager") == 1

# -----------------------------------------------------------------------------
# Micro batch size: the search, the probe, and auto in a real run


@pytest.mark.parametrize("limit, candidates, start, expected", [
    (64, [1, 2, 4, 8, 16, 32, 64], 8, 64),       # everything fits: doubles up to the largest
    (40, [1, 2, 4, 8, 16, 32, 64], 8, 32),
    (5, [1, 2, 4, 8, 16, 32, 64], 8, 4),         # the start does not fit: halves
    (0, [1, 2, 4, 8, 16, 32, 64], 8, None),      # nothing fits
    (11, [1, 2, 3, 4, 6, 8, 12, 24], 8, 8),      # divisors that are not powers of two
    (7, [1, 2, 3, 4, 6, 8, 12, 24], 8, 6),
    (13, [1, 2, 3, 4, 6, 8, 12, 24], 2, 12),     # bisects between 8 (fits) and 24 (does not)
    (3, [1, 3, 9], 100, 3),                      # a start above every candidate
])
def test_micro_batch_search_finds_the_largest_that_fits(limit, candidates, start, expected):
    tried = []

    def try_batch(b):
        tried.append(b)
        return b <= limit

    assert device_mod.find_micro_batch_size(try_batch, candidates, start) == expected
    assert len(tried) == len(set(tried))  # no size is probed twice
    assert len(tried) <= 6


class BrokenLM(TinyLM):
    def forward(self, idx, targets):
        raise ValueError("a bug, not a full GPU")


def test_probe_catches_a_real_out_of_memory_and_frees_the_gradients():
    model = TinyLM(oom_above=4)
    cpu = torch.device("cpu")
    assert device_mod.fits(model, 4, 8, cpu, "fp32")
    assert not device_mod.fits(model, 5, 8, cpu, "fp32")
    assert all(p.grad is None for p in model.parameters())
    chosen = device_mod.find_micro_batch_size(lambda b: device_mod.fits(model, b, 8, cpu, "fp32"), [1, 2, 4, 8, 16], 16)
    assert chosen == 4
    with pytest.raises(ValueError):  # only out-of-memory errors mean "does not fit"
        device_mod.fits(BrokenLM(), 2, 8, cpu, "fp32")


def test_auto_micro_batch_size_probes_an_accelerator(monkeypatch):
    # The meta device stands in for a GPU: real forward and backward passes, no memory used.
    line = device_mod.auto_micro_batch_size(lambda: TinyLM(oom_above=12), 64 * 16, 16, torch.device("meta"), "fp32")
    assert line[0] == 8  # 12 fits but does not divide 64 sequences; 16 does not fit
    assert "micro batch auto: 8 (probed on meta: tried 8, 16" in line[1]
    with pytest.raises(device_mod.DeviceError, match="does not fit .* even at micro batch size 1"):
        device_mod.auto_micro_batch_size(lambda: TinyLM(oom_above=0), 64 * 16, 16, torch.device("meta"), "fp32")


def test_auto_probes_the_model_training_builds(monkeypatch, capsys, tmp_path):
    # GPT itself on the meta device (real passes, no memory): everything fits, so the largest divisor.
    probed = []  # the run options change the memory a step takes: the probe must use training's
    real_fits = device_mod.fits
    monkeypatch.setattr(device_mod, "fits", lambda model, *rest: probed.append(
        model.activation_checkpointing) or real_fits(model, *rest))
    monkeypatch.setattr(device_mod, "resolve_dtype", lambda device_type, requested: "fp32")
    monkeypatch.setattr(device_mod, "torch_device", lambda device_type, rank: torch.device("meta"))
    args = parse_args(["--data_root", "x", "--model", "d2", "--seq_len", "32", "--total_batch_size", "1024",
                       "--micro_batch_size", "auto", "--activation_checkpointing", "--device", "cpu",
                       "--log_dir", str(tmp_path / "log")])
    config, _, _, lock, _ = train_gpt2.setup(args)
    lock.release()
    assert config.micro_batch_size == 32 and config.grad_accum_steps == 1 and dict(config.sources)[
        "micro_batch_size"] == "auto (flag)"
    assert ("micro batch auto: 32 (probed on meta: tried 8, 16, 32; divisors of 32 sequences per rank per step)"
            in capsys.readouterr().out.splitlines())
    assert probed and all(probed)


def test_micro_batch_auto_keeps_the_token_batch(tiny_data, tmp_path):
    args = list(TINY_RUN)
    args[args.index("--micro_batch_size") + 1] = "auto"
    result = run_train(args + ["--data_root", tiny_data, "--log_dir", tmp_path, "--total_batch_size", 512, "--max_steps", 1],
                       cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "micro batch auto: 8 (cpu: host memory is not probed" in result.stdout
    assert "grad_accum_steps     2" in result.stdout  # 512 tokens = 2 x 8 x 32
    assert "micro_batch_size     8                        auto (flag)" in result.stdout


# -----------------------------------------------------------------------------
# Memory statistics and out-of-memory errors


def test_memory_stats_are_empty_on_cpu_and_in_gib_on_cuda_and_mps(monkeypatch):
    assert device_mod.memory_stats(torch.device("cpu")) == {}
    monkeypatch.setattr(torch.cuda, "memory_stats", lambda d: {"allocated_bytes.all.current": 2 * 2**30,
                                                               "reserved_bytes.all.current": 3 * 2**30,
                                                               "allocated_bytes.all.peak": 4 * 2**30})
    assert device_mod.memory_stats(torch.device("cuda", 0)) == {"mem_alloc_gib": 2.0, "mem_reserved_gib": 3.0, "mem_peak_gib": 4.0}
    # MPS has no peak counter: the peak is the most allocated at any call so far.
    monkeypatch.setattr(device_mod, "_mps_peak", [0])
    monkeypatch.setattr(torch.mps, "driver_allocated_memory", lambda: 8 * 2**30)
    peaks = []
    for allocated in (3, 5, 1):
        monkeypatch.setattr(torch.mps, "current_allocated_memory", lambda a=allocated: a * 2**30)
        stats = device_mod.memory_stats(torch.device("mps"))
        assert stats["mem_alloc_gib"] == allocated and stats["mem_reserved_gib"] == 8.0
        peaks.append(stats["mem_peak_gib"])
    assert peaks == [3.0, 5.0, 5.0]


def test_out_of_memory_is_recognised_on_cuda_and_mps():
    assert device_mod.is_oom(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    assert device_mod.is_oom(RuntimeError("MPS backend out of memory (MPS allocated: 9.07 GiB)"))
    assert not device_mod.is_oom(RuntimeError("expected scalar type BFloat16 but found Float"))


def test_oom_message_names_the_micro_batch_and_the_fixes():
    message = device_mod.oom_message(torch.device("cpu"), 16, 1024, activation_checkpointing=False)
    for text in ("micro batch size 16 x 1024 tokens", "--micro_batch_size 8", "--micro_batch_size auto",
                 "--activation_checkpointing"):
        assert text in message
    smallest = device_mod.oom_message(torch.device("cpu"), 1, 1024, activation_checkpointing=True)
    assert "--micro_batch_size 0" not in smallest and "--activation_checkpointing" not in smallest


def test_out_of_memory_in_training_exits_with_one_clear_message(tiny_data, tmp_path, monkeypatch, capsys):
    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setattr(train_gpt2, "train_step", out_of_memory)
    monkeypatch.setattr(signal, "signal", lambda *a: None)
    with pytest.raises(SystemExit) as exit_info:
        train_gpt2.main(TINY_RUN + ["--data_root", str(tiny_data), "--log_dir", str(tmp_path), "--max_steps", "1"])
    assert exit_info.value.code == 1
    err = capsys.readouterr().err
    assert err.startswith("error: out of memory on cpu at micro batch size 4 x 32 tokens")
    assert "--micro_batch_size 2" in err and "--micro_batch_size auto" in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1


def test_memory_keys_reach_metrics_jsonl_on_an_accelerator(tiny_data, tmp_path, monkeypatch):
    # The CPU has no device memory to report; pretend it does, as CUDA would.
    monkeypatch.setattr(device_mod, "memory_stats", lambda device: {"mem_alloc_gib": 1.5, "mem_reserved_gib": 2.0,
                                                                    "mem_peak_gib": 2.5})
    monkeypatch.setattr(signal, "signal", lambda *a: None)
    train_gpt2.main(TINY_RUN + ["--data_root", str(tiny_data), "--log_dir", str(tmp_path), "--total_batch_size", "128",
                                "--max_steps", "1"])
    step = [r for r in read_metrics(tmp_path) if "loss" in r][0]
    assert (step["mem_alloc_gib"], step["mem_reserved_gib"], step["mem_peak_gib"]) == (1.5, 2.0, 2.5)


# -----------------------------------------------------------------------------
# --deterministic


def test_deterministic_mode_switches_every_source_and_says_so(monkeypatch):
    import torch._inductor.config as inductor_config

    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    try:
        lines = device_mod.set_deterministic("cuda", True)
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"  # before cuBLAS starts: torch demands it
        assert torch.are_deterministic_algorithms_enabled() and torch.backends.cudnn.deterministic
        assert inductor_config.deterministic
        assert len(lines) == 1 and "cuDNN attention is left out" in lines[0] and "Inductor without autotuning" in lines[0]
        assert "cuda: TF32 matmuls on, cudnn.benchmark off" in device_mod.apply_device_settings("cuda", deterministic=True)
    finally:
        assert device_mod.set_deterministic("cuda", False) == []
    assert not torch.are_deterministic_algorithms_enabled() and not inductor_config.deterministic
    assert "cuda: TF32 matmuls on, cudnn.benchmark on" in device_mod.apply_device_settings("cuda")


def test_deterministic_is_recorded_kept_by_a_resume_and_a_change_is_said(tiny_data, tmp_path, capsys):
    import checkpoint

    run = TINY_RUN + ["--data_root", str(tiny_data), "--log_dir", str(tmp_path), "--total_batch_size", "128"]
    try:
        train_gpt2.main(run + ["--max_steps", "2", "--deterministic"])
        assert "deterministic: torch.use_deterministic_algorithms on" in capsys.readouterr().out
        assert checkpoint.load_checkpoint(tmp_path / "model_00001.pt")["run_config"]["deterministic"] is True
        train_gpt2.main(run + ["--max_steps", "3", "--auto_resume"])  # the run's own setting
        assert "deterministic: torch.use_deterministic_algorithms on" in capsys.readouterr().out
        train_gpt2.main(run + ["--max_steps", "4", "--auto_resume", "--deterministic=False"])
        assert ("resume: --deterministic False, where the checkpoint's run had True: the steps from here on no longer "
                "repeat bit for bit on CUDA") in capsys.readouterr().out
        assert not torch.are_deterministic_algorithms_enabled()
    finally:
        device_mod.set_deterministic("cpu", False)
