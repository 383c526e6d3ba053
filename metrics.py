"""Training metrics: what users watch during a run and use to compare runs.

Public API (the loop makes one call per step, one per evaluation):
    metrics = Metrics(log_dir, Throughput(tokens_per_step=524288, flops_per_token=..., peak_flops=..., world_size=8),
                      enabled=ddp.master, device_type="cuda", start_step=0, total_steps=19073, log_interval=1,
                      tensorboard=False, wandb=None)   # wandb: WandbRun(project, name, config, tracked)
    train_step(..., timer=metrics.timer)       # marks data / fwd / bwd / optim inside the step (StepTimer)
    metrics.log_step(step, dt, loss=..., lr=..., norm=..., **extra)   # extra: any scalars, e.g. mem_* keys
    metrics.log(step, val_loss=...)            # any other record: val_loss, hellaswag_acc_norm, ...
    metrics.close()
    mfu(flops_per_token, tokens, seconds, peak_flops, world_size) -> float or None
    peak_flops(device, dtype)   datasheet peak FLOP/s of this GPU (PEAK_FLOPS), or None: no MFU
    process_memory() -> {"mem_rss_gib", "mem_rss_peak_gib"}   this process's resident host memory
    MetricsError                               # a missing optional package; the message names the fix

What it writes (rank 0 only; other ranks keep quiet):
- <log_dir>/metrics.jsonl, one JSON object per line, appended across resumes (a resumed run may log a
  step twice; the later line is the one that counts). Step records: step, loss, lr, norm, dt_ms (this
  step), tok_per_sec, mfu (known GPUs only), mem_rss_gib and mem_rss_peak_gib (the process's host
  memory), plus any extra keys the loop passes (device memory: mem_alloc_gib, ...). Every log_interval
  steps and at the last step also the split of the step time, each a mean over the same steps, those
  since the last report: mean_dt_ms (of their dt_ms), data_ms, fwd_ms, bwd_ms, optim_ms (the phases,
  which add up to at most mean_dt_ms: the rest is the loop's own host work and the wait for the
  step's result), data_share = data_ms / mean_dt_ms and compute_share = (fwd + bwd + optim) / mean_dt_ms.
  The printed line at that step shows the same means: dt, tok/s and MFU of mean_dt_ms. Other records:
  step + val_loss, or step + hellaswag_acc, hellaswag_acc_norm, hellaswag_n.
- <log_dir>/tensorboard/ with --tensorboard: the same scalars (needs `pip install tensorboard`).
- a Weights & Biases run with --wandb (needs `pip install wandb`; WANDB_MODE=offline works without a
  network, files in <log_dir>/wandb). Its id lives in the checkpoints (TrackedRun), so --auto_resume
  logs to the same run; W&B keeps the first value of a step logged twice, metrics.jsonl the last.
- stdout: a tqdm bar over the steps (loss, tok/s, ETA) when stdout is a terminal; one plain line
  per log_interval otherwise (CI, `> train.log`), so log files hold no carriage-return clutter.

MFU, model FLOPs utilisation, is achieved model FLOP/s over the hardware's peak:

    mfu = flops_per_token * tokens_per_step / dt / (peak_flops * world_size)
    flops_per_token = GPT.flops_per_token(T) = 6 * N + 12 * n_layer * n_embd * T

6 * N: every weight does one multiply-add (2 FLOPs) per token in the forward pass and two in the
backward pass (gradients of the input and of the weight). N counts the tied embedding once (it is the
lm_head matmul) and leaves out the position table, a lookup. 12 * n_layer * n_embd * T: attention's
two matmuls with the T keys (Q K^T and the weighted sum of V, n_head * head_dim = n_embd wide) cost
2 * 2 * n_embd * T per token and layer forward, times 3 with the backward; causal masking is not
subtracted (the PaLM convention). Recomputation (activation checkpointing) is not counted: MFU counts
the model's FLOPs, not the hardware's. peak_flops is the datasheet dense peak for the precision
(PEAK_FLOPS, below); on an unknown GPU, MPS or CPU there is no mfu rather than a wrong one.
"""
import importlib
import json
import os
import sys
import time
import uuid
from pathlib import Path

import environment  # noqa: F401  before torch (imported where a timer needs it): it sets variables torch reads
from cli import UserError

PHASES = ("data", "fwd", "bwd", "optim")  # how a training step's time is split, in order
SPLIT_KEYS = ("mean_dt_ms", *(f"{phase}_ms" for phase in PHASES), "data_share", "compute_share")


class MetricsError(UserError):
    """An optional package the asked-for output needs is missing; the message names the fix."""


class Throughput:
    """What a step's time is measured against: its tokens (over all ranks), the model FLOPs per token,
    and the hardware's peak (None: no MFU)."""

    def __init__(self, tokens_per_step, flops_per_token=None, peak_flops=None, world_size=1):
        self.tokens_per_step, self.flops_per_token = tokens_per_step, flops_per_token
        self.peak_flops, self.world_size = peak_flops, world_size

    def tokens_per_sec(self, seconds):
        return self.tokens_per_step / seconds if seconds > 0 else 0.0

    def mfu(self, seconds):
        return mfu(self.flops_per_token or 0, self.tokens_per_step, seconds, self.peak_flops, self.world_size)


def mfu(flops_per_token, tokens, seconds, peak_flops, world_size=1):
    """Model FLOPs utilisation of `tokens` processed in `seconds` by world_size devices, or None
    when the peak is unknown (see the module docstring for the formula)."""
    if not peak_flops or seconds <= 0:
        return None
    return flops_per_token * tokens / seconds / (peak_flops * world_size)


# Dense (no sparsity) peak tensor-core FLOP/s by GPU name, from the vendors' datasheets.
# MFU = achieved model FLOP/s / this. Unknown GPUs get no MFU rather than a wrong one.
PEAK_FLOPS = {  # name substring: {dtype: FLOP/s}
    "H200": {"bf16": 989e12, "fp16": 989e12, "fp32": 494e12},
    "H100 NVL": {"bf16": 835e12, "fp16": 835e12, "fp32": 418e12},
    "H100 PCIe": {"bf16": 756e12, "fp16": 756e12, "fp32": 378e12},
    "H100": {"bf16": 989e12, "fp16": 989e12, "fp32": 494e12},   # SXM
    "A100": {"bf16": 312e12, "fp16": 312e12, "fp32": 156e12},
    "L40S": {"bf16": 362e12, "fp16": 362e12, "fp32": 183e12},
    "A10G": {"bf16": 70e12, "fp16": 70e12, "fp32": 35e12},
    "RTX 4090": {"bf16": 165e12, "fp16": 165e12, "fp32": 82.6e12},
    "RTX 3090": {"bf16": 71e12, "fp16": 71e12, "fp32": 35.6e12},
    "V100": {"fp16": 125e12, "fp32": 15.7e12},
}


def peak_flops(device, dtype):
    """Peak FLOP/s of this GPU for `dtype` (TF32 for fp32 matmuls), or None when unknown."""
    if device.type != "cuda":
        return None
    import torch

    name = torch.cuda.get_device_name(device)
    for key, rates in PEAK_FLOPS.items():  # ordered: specific names before their family
        if key in name:
            return rates.get(dtype)
    return None


def process_memory():
    """This process's resident host memory in GiB: now (Linux, /proc/self/statm: one read, ~10 us) and
    the peak since it started (getrusage: KiB on Linux, bytes on macOS). {} where neither is known."""
    gib, stats = 2**30, {}
    try:
        resident_pages = int(Path("/proc/self/statm").read_text().split()[1])
        stats["mem_rss_gib"] = resident_pages * os.sysconf("SC_PAGE_SIZE") / gib
    except (OSError, ValueError, IndexError, AttributeError):
        pass
    try:
        import resource
    except ImportError:  # Windows
        return stats
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    peak = peak / gib if sys.platform == "darwin" else peak * 1024 / gib
    # Linux updates the peak lazily, so it may lag the resident size just read by a few pages.
    stats["mem_rss_peak_gib"] = max(peak, stats.get("mem_rss_gib", 0.0))
    return stats


class StepTimer:
    """Splits each training step's time into data, forward, backward and optimizer phases without a
    device sync per step.

    train_step calls start() and then mark(phase) at the end of each phase. On CUDA and MPS, a
    mark records an event on the device's stream, and events are read only in report(), at the log
    interval, after the loop's loss.item() has waited for the step anyway. The time between two
    events is the time the device timeline spent between the marks, so host work the device hides
    (loading the next batch while kernels run) rightly costs almost nothing. On the CPU the work is
    synchronous and perf_counter marks are the truth. A disabled timer records nothing."""

    def __init__(self, device_type="cpu", enabled=True):
        self.enabled = enabled
        self.device_type = device_type
        self._marks = []  # (phase or None for a step start, event or perf_counter seconds)
        self._free_events = []
        self._steps = 0

    def _now(self):
        if self.device_type not in ("cuda", "mps"):
            return time.perf_counter()
        import torch

        event_class = torch.cuda.Event if self.device_type == "cuda" else torch.mps.event.Event
        event = self._free_events.pop() if self._free_events else event_class(enable_timing=True)
        event.record()
        return event

    def start(self):
        if self.enabled:
            self._marks.append((None, self._now()))
            self._steps += 1

    def mark(self, phase):
        """The phase that ended now: one of PHASES. Repeated phases (per micro step) add up. The backward
        phase holds DDP's all-reduce (overlapped with it) and FSDP's gradient reduce-scatter."""
        if self.enabled and self._marks:
            self._marks.append((phase, self._now()))

    def report(self):
        """{"data_ms", "fwd_ms", "bwd_ms", "optim_ms"}: mean per step since the last report, then reset.
        Empty when nothing was marked."""
        marks, steps = self._marks, max(self._steps, 1)
        self._marks, self._steps = [], 0
        if not any(phase for phase, _ in marks):
            return {}
        totals = dict.fromkeys(PHASES, 0.0)
        timed = self.device_type in ("cuda", "mps")
        if timed:
            marks[-1][1].synchronize()  # already complete after loss.item(); free otherwise
            self._free_events.extend(event for _, event in marks)  # recorded again only from the next mark on
        for (_, before), (phase, after) in zip(marks, marks[1:]):
            if phase is None:
                continue  # from the end of one step to the start of the next: not the step's time
            totals[phase] = totals.get(phase, 0.0) + (before.elapsed_time(after) if timed else (after - before) * 1000)
        return {f"{phase}_ms": total / steps for phase, total in totals.items()}


class TrackedRun:
    """Which experiment-tracker run this training run logs to: a checkpointed part (state_dict /
    load_state_dict), so that a resumed run continues the same tracked run rather than a new one."""

    def __init__(self):
        self.wandb_run_id = None

    def state_dict(self):
        return {"wandb_run_id": self.wandb_run_id}

    def load_state_dict(self, state):
        self.wandb_run_id = state.get("wandb_run_id")


class WandbRun:
    """--wandb: the project, run name and config to log under, and the TrackedRun that keeps its id."""

    def __init__(self, project, name, config, tracked):
        self.project, self.name, self.config, self.tracked = project, name, config, tracked


def import_for(flag, module):
    """The module that --flag needs, or MetricsError naming the package to install (the flag's name)."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise MetricsError(f"--{flag} needs the {flag} package, which is not installed: pip install {flag} "
                           f"(or run without --{flag})") from None


def tensorboard_tag(key):
    """Group the scalars in TensorBoard's UI: train/loss, val/loss, hellaswag/acc_norm, perf/..."""
    for prefix, group in (("val_", "val"), ("hellaswag_", "hellaswag"), ("mem_", "memory")):
        if key.startswith(prefix):
            return f"{group}/{key[len(prefix):]}"
    if key in ("dt_ms", "tok_per_sec", "mfu") or key in SPLIT_KEYS:
        return f"perf/{key}"
    return f"train/{key}"


def is_terminal(stream):
    """A terminal a bar can be drawn on: a tty with a width (a pty of 0 columns would show nothing)."""
    if not stream.isatty():
        return False
    try:
        return os.get_terminal_size(stream.fileno()).columns > 0
    except (AttributeError, OSError, ValueError):
        return True  # a tty-like stream without a file descriptor


def format_value(value):
    if isinstance(value, float):
        return f"{value:.4f}" if abs(value) >= 1e-3 or value == 0 else f"{value:.3e}"
    return str(value)


class Metrics:
    """Records, TensorBoard scalars and the progress display of one training run (see the module
    docstring). Construct it on every rank: only the one with enabled=True writes or prints, and
    --tensorboard is checked everywhere so all ranks stop together when the package is missing."""

    def __init__(self, log_dir, throughput=None, enabled=True, device_type="cpu", start_step=0, total_steps=None,
                 log_interval=1, tensorboard=False, wandb=None, stream=None):
        self.enabled = enabled
        self.total_steps = total_steps
        self.log_interval = log_interval
        self.throughput = throughput or Throughput(0)
        self.timer = StepTimer(device_type, enabled=enabled)
        self.stream = stream or sys.stdout
        self.file = self.writer = self.bar = self.wandb_run = self._stdout = None
        self._dt_sum, self._dt_count = 0.0, 0  # the steps since the last report: what the timer's means cover
        # The optional packages are imported on every rank: all stop together if one is missing.
        if wandb is not None:
            wandb_module = import_for("wandb", "wandb")
            if enabled:
                self.wandb_run = self._start_wandb(wandb_module, wandb, log_dir)
        if tensorboard:
            summary_writer = import_for("tensorboard", "torch.utils.tensorboard").SummaryWriter
            if enabled:
                tensorboard_dir = os.path.join(log_dir, "tensorboard")
                self.writer = summary_writer(log_dir=tensorboard_dir)
                print(f"tensorboard: writing to {tensorboard_dir} (view with: tensorboard --logdir {tensorboard_dir})",
                      file=self.stream)
        if not enabled:
            return
        os.makedirs(log_dir, exist_ok=True)
        self.file = open(os.path.join(log_dir, "metrics.jsonl"), "a")
        if is_terminal(self.stream) and total_steps is not None:
            self._start_bar(start_step)

    def _start_wandb(self, wandb_module, options, log_dir):
        """W&B's own variables win where the user set them (WANDB_PROJECT, WANDB_NAME, WANDB_RUN_ID, WANDB_DIR);
        the run id is kept in the checkpoints either way, so a resume continues the same W&B run."""
        env = os.environ
        if env.get("WANDB_RUN_ID"):
            options.tracked.wandb_run_id = env["WANDB_RUN_ID"]
        resumed = options.tracked.wandb_run_id is not None
        if not resumed:
            options.tracked.wandb_run_id = uuid.uuid4().hex[:8]  # W&B's own id format: 8 of [a-z0-9]
        project, name = env.get("WANDB_PROJECT") or options.project, env.get("WANDB_NAME") or options.name
        files_dir = env.get("WANDB_DIR") or log_dir
        os.makedirs(files_dir, exist_ok=True)
        run = wandb_module.init(project=project, name=name, id=options.tracked.wandb_run_id,
                                resume="allow", dir=files_dir, config=options.config,
                                settings=wandb_module.Settings(quiet=True))
        offline = " (offline: `wandb sync " + os.path.join(files_dir, "wandb") + "` uploads it)" \
            if os.environ.get("WANDB_MODE") in ("offline", "dryrun") else ""
        print(f"wandb: {'continuing' if resumed else 'new'} run {run.id} ({name}) in project "
              f"{project}{offline}", file=self.stream)
        return run

    def _start_bar(self, start_step):
        from tqdm import tqdm
        from tqdm.contrib import DummyTqdmFile

        self.bar = tqdm(total=self.total_steps, initial=start_step, file=self.stream, unit="step",
                        dynamic_ncols=True, desc="train")
        if self.stream is sys.stdout:
            # Other modules' prints (val loss, samples, checkpoints) go above the bar, not through it.
            self._stdout, sys.stdout = sys.stdout, DummyTqdmFile(sys.stdout)

    def log_step(self, step, dt, loss, lr, norm, **extra):
        """One training step that took dt seconds. The split of the step time (SPLIT_KEYS) joins the record
        every log_interval steps and at the last step; extra keys (e.g. mem_alloc_gib) are recorded as given."""
        tok_per_sec = self.throughput.tokens_per_sec(dt)
        record = dict(step=step, loss=loss, lr=lr, norm=norm, dt_ms=dt * 1000, tok_per_sec=tok_per_sec)
        step_mfu = self.throughput.mfu(dt)
        if step_mfu is not None:
            record["mfu"] = step_mfu
        self._dt_sum, self._dt_count = self._dt_sum + dt, self._dt_count + 1
        report = step % self.log_interval == 0 or step == (self.total_steps or 0) - 1
        if report:
            record.update(self._split())
        record.update(process_memory(), **extra)
        if not self.enabled:
            return record
        self._write(record)
        if self.bar is not None:
            postfix = {"loss": f"{loss:.4f}", "tok/s": f"{tok_per_sec:,.0f}"}
            if step_mfu is not None:
                postfix["mfu"] = f"{step_mfu:.1%}"
            self.bar.set_postfix(postfix, refresh=False)
            self.bar.update(1)
        elif report:
            print(self._step_line(record), file=self.stream, flush=True)
        return record

    def _split(self):
        """The means over the steps since the last report, then reset: mean_dt_ms and, where the timer
        marked phases, each phase and the data and compute shares of the step."""
        mean_dt_ms = self._dt_sum / max(self._dt_count, 1) * 1000
        self._dt_sum, self._dt_count = 0.0, 0
        split = {"mean_dt_ms": mean_dt_ms, **self.timer.report()}
        if "data_ms" in split and mean_dt_ms > 0:
            split["data_share"] = split["data_ms"] / mean_dt_ms
            split["compute_share"] = sum(split[f"{phase}_ms"] for phase in PHASES[1:]) / mean_dt_ms
        return split

    def _step_line(self, r):
        """The printed line of a report step: dt, tok/s and MFU are means over the same steps as the phases."""
        seconds = r["mean_dt_ms"] / 1000
        line = (f"step {r['step']:5d} | loss {r['loss']:.6f} | lr {r['lr']:.4e} | norm {r['norm']:.4f} | "
                f"dt {r['mean_dt_ms']:.1f} ms | {self.throughput.tokens_per_sec(seconds):,.0f} tok/s")
        interval_mfu = self.throughput.mfu(seconds)
        if interval_mfu is not None:
            line += f" | MFU {interval_mfu:.1%}"
        if "data_ms" in r:
            line += (" | " + "/".join(PHASES) + " " + "/".join(f"{r[f'{phase}_ms']:.1f}" for phase in PHASES)
                     + f" ms (data {r['data_share']:.0%}, compute {r['compute_share']:.0%})")
        memory = {key: value for key, value in r.items()
                  if key.startswith("mem_") and key.endswith("_gib") and not key.startswith("mem_rss")}
        if memory:  # device.memory_stats: mem_alloc_gib, mem_peak_gib, ... -> "mem alloc/peak 1.2/3.4 GiB"
            line += (f" | mem {'/'.join(key[4:-4] for key in memory)} "
                     f"{'/'.join(f'{value:.1f}' for value in memory.values())} GiB")
        if "mem_rss_gib" in r:  # the host's: on the CPU the only memory there is
            line += f" | rss {r['mem_rss_gib']:.2f} GiB"
        elif "mem_rss_peak_gib" in r:  # macOS: only the peak is known
            line += f" | rss peak {r['mem_rss_peak_gib']:.2f} GiB"
        known = {"step", "loss", "lr", "norm", "dt_ms", "tok_per_sec", "mfu", "mem_rss_gib", "mem_rss_peak_gib",
                 *SPLIT_KEYS}
        for key, value in r.items():
            if key not in known and key not in memory:
                line += f" | {key} {format_value(value)}"
        return line

    def log(self, step, **values):
        """Any other record for this step (validation loss, HellaSwag), written and printed on one line."""
        if not self.enabled:
            return
        self._write(dict(step=step, **values))
        line = f"step {step:5d} | " + " | ".join(f"{key.replace('_', ' ')} {format_value(value)}"
                                                  for key, value in values.items())
        if self.bar is not None:
            self.bar.write(line, file=self._stdout or self.stream)
        else:
            print(line, file=self.stream, flush=True)

    def _write(self, record):
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        scalars = {key: value for key, value in record.items()
                   if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool)}
        if self.writer is not None:
            for key, value in scalars.items():
                self.writer.add_scalar(tensorboard_tag(key), value, record["step"])
        if self.wandb_run is not None:
            self.wandb_run.log({tensorboard_tag(key): value for key, value in scalars.items()}, step=record["step"])

    def close(self):
        if self._stdout is not None:
            sys.stdout, self._stdout = self._stdout, None
        for name, end in (("bar", "close"), ("writer", "close"), ("wandb_run", "finish"), ("file", "close")):
            part = getattr(self, name)
            if part is not None:
                getattr(part, end)()
                setattr(self, name, None)
