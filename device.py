"""Devices: pick CUDA > Apple MPS > CPU, apply per-device settings, compile with fallbacks,
size the micro batch to the memory, report memory.

Public API:
    PRESETS                                 per-device defaults for --preset (never the learning rate)
    select_device(requested)                -> "cuda" | "mps" | "cpu"  (DeviceError naming the checks if missing)
    torch_device(device_type, local_rank)   -> torch.device for this process
    apply_device_settings(device_type, num_threads, mps_memory_fraction) -> what was set, one line each
    resolve_dtype(device_type, requested)   -> "bf16" | "fp16" | "fp32"
    autocast(device_type, dtype)            -> context manager for the forward pass
    choose_loss(requested, loss_chunk_rows, device) -> (model.LOSSES entry, one line)   --fused_loss auto|on|off
    compile_model(model, device_type, mode, trial=, wrap=) -> (model, mode used), down a fallback chain
    forward_backward(model, batch_size, seq_len, device, dtype)  one training-shaped pass on random tokens
    find_micro_batch_size(try_batch, candidates, start)  -> the largest candidate that fits (the search alone)
    auto_micro_batch_size(make_model, tokens_per_rank, seq_len, device, dtype) -> (micro batch, one line)
    memory_stats(device)                    -> {"mem_alloc_gib", "mem_reserved_gib", "mem_peak_gib"}, {} on CPU
    is_oom(exc), oom_message(...)           recognise and explain an out-of-memory error

`python device.py` prints a report of what this machine has and what training would use.
"""
import bisect
import contextlib
import gc
import os
import sys
import time

import environment
import torch

import cli
import distributed
import triton_loss

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")

# Per-device defaults that do not change the math: how the work is laid out and run. They only
# fill options the user did not give (run_config.resolve), and none of them is a learning rate.
PRESETS = {
    # micro batch "auto": the largest that fits this GPU (probed at start); compile: faster than eager
    # with either loss (docs/PERFORMANCE.md).
    # hang_timeout: 15 minutes, past a slow save or the first evaluation's compile; NCCL's own is 10.
    "cuda": dict(micro_batch_size="auto", dtype="auto", compile="default", pin_memory=True, hang_timeout=900),
    # torch.compile on MPS is young: opt in with --compile (it falls back to eager if it fails).
    "mps": dict(micro_batch_size=8, dtype="auto", compile="none", pin_memory=False, hang_timeout=0),
    # Compiling a small CPU model costs more time than it saves in a short run. Threads: torch's
    # own count (one per physical core; OMP_NUM_THREADS or --num_threads override it).
    "cpu": dict(micro_batch_size=8, dtype="fp32", compile="none", pin_memory=False, hang_timeout=0),
}


class DeviceError(cli.UserError):
    """The asked-for device or setting cannot be used here; the message names the fix."""


DEVICE_CHOICES = ["auto", "cuda", "mps", "cpu"]
DTYPE_CHOICES = ["auto", "bf16", "fp16", "fp32"]
DEVICE_HELP = "auto picks CUDA > MPS > CPU"
DTYPE_HELP = "autocast precision (auto: bf16 on CUDA/MPS, fp32 on CPU)"


def add_device_arguments(parser, dtype=True):
    """--device (and --dtype), the same in every command line of the project; the trainer's are RunConfig fields
    with the same choices and help."""
    parser.add_argument("--device", default="auto", choices=DEVICE_CHOICES, help=DEVICE_HELP)
    if dtype:
        parser.add_argument("--dtype", default="auto", choices=DTYPE_CHOICES, help=DTYPE_HELP)


def select_device(requested="auto"):
    """CUDA if present, else Apple MPS, else CPU; an explicit request must exist."""
    if requested == "auto":
        if torch.cuda.is_available():
            return "cuda"
        if torch.backends.mps.is_available():
            return "mps"
        return "cpu"
    if requested == "cuda" and not torch.cuda.is_available():
        if torch.backends.cuda.is_built():
            checks = ("this torch has CUDA, so the GPU or driver is not visible: run `nvidia-smi` (driver loaded? "
                      "GPU listed?) and check CUDA_VISIBLE_DEVICES")
        else:
            checks = ("this torch was built without CUDA: install a CUDA build "
                      "(https://pytorch.org/get-started/locally/), then check with `nvidia-smi`")
        raise DeviceError(f"--device cuda was asked for but no CUDA GPU is visible to torch {torch.__version__}; "
                          f"{checks}; or use --device auto")
    if requested == "mps" and not torch.backends.mps.is_available():
        why = ("torch was built with MPS, so this is not an Apple-silicon Mac on macOS 12.3+"
               if torch.backends.mps.is_built()
               else "this torch was built without MPS (MPS needs the macOS arm64 build of torch)")
        raise DeviceError(f"--device mps was asked for but Apple MPS is not available: {why}. Check with "
                          "`python -c \"import torch; print(torch.backends.mps.is_built(), torch.backends.mps.is_available())\"`"
                          ", or use --device auto or --device cpu")
    if requested not in ("cuda", "mps", "cpu"):
        raise DeviceError(f"unknown --device {requested!r}; use auto, cuda, mps or cpu")
    return requested


def torch_device(device_type, local_rank=0):
    if device_type == "cuda":
        count = torch.cuda.device_count()
        if local_rank >= count:
            raise DeviceError(f"process with LOCAL_RANK {local_rank} has no GPU: only {count} visible; "
                              f"start at most {count} processes per node (torchrun --nproc_per_node {count})")
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device(device_type)


def apply_device_settings(device_type, num_threads=None, mps_memory_fraction=None, deterministic=False):
    """Speed and memory settings that are safe for training; returns what was set, one line each."""
    applied = list(environment.LINES.get(device_type, []))
    if device_type == "cuda":
        # TF32 matmuls for any fp32 work left outside autocast: tensor cores instead of the fp32 units, with
        # ample precision for training.
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = not deterministic
        applied.append(f"cuda: TF32 matmuls on, cudnn.benchmark {'off' if deterministic else 'on'}")
    applied += set_deterministic(device_type, deterministic)
    if mps_memory_fraction is not None:
        if device_type != "mps":
            applied.append(f"--mps_memory_fraction {mps_memory_fraction} ignored: training on {device_type}")
        elif not 0 <= mps_memory_fraction <= 2:
            raise DeviceError(f"--mps_memory_fraction {mps_memory_fraction} is outside 0..2; it is a fraction of the "
                              "GPU's recommended working set (0 = no limit, which can freeze macOS), e.g. 0.8")
        else:
            torch.mps.set_per_process_memory_fraction(mps_memory_fraction)
            applied.append(f"mps: memory limit {mps_memory_fraction} x the recommended working set "
                           f"({mps_memory_fraction * torch.mps.recommended_max_memory() / 2**30:.1f} GiB)")
    if num_threads and num_threads != torch.get_num_threads():
        torch.set_num_threads(num_threads)
    if device_type == "cpu":
        applied.append(f"cpu: {torch.get_num_threads()} threads")
    return applied


# What --deterministic switches, and why (docs/DETERMINISM.md has the measurements).
DETERMINISTIC_SWITCHES = {
    "cuda": "deterministic: cuBLAS with a fixed workspace (CUBLAS_WORKSPACE_CONFIG=:4096:8); "
            "torch.use_deterministic_algorithms: attention's backward without atomics (cuDNN attention is left out, "
            "flash attention runs its deterministic backward), the embedding gradient summed in a fixed order; "
            "Inductor without autotuning that changes the order of sums; cudnn.benchmark off",
    "mps": "deterministic: torch.use_deterministic_algorithms on; MPS kernels give no bit-for-bit promise "
           "(docs/DETERMINISM.md)",
    "cpu": "deterministic: torch.use_deterministic_algorithms on; the CPU already repeats a run bit for bit at the "
           "same --num_threads",
}


def set_deterministic(device_type, on):
    """Turn the bit-for-bit mode on or off; returns one line saying what was switched (none when off).
    CUBLAS_WORKSPACE_CONFIG is read when cuBLAS starts, so on CUDA this must run before the first matmul."""
    if on and device_type == "cuda":
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(on)
    torch.backends.cudnn.deterministic = on
    with contextlib.suppress(ImportError, AttributeError):
        import torch._inductor.config as inductor_config

        inductor_config.deterministic = on
    return [DETERMINISTIC_SWITCHES[device_type]] if on else []


def resolve_dtype(device_type, requested="auto"):
    """Autocast precision: bf16 on CUDA GPUs that support it (fp16 + grad scaling on older ones),
    bf16 on MPS where the OS supports it, fp32 on CPU unless asked."""
    if requested != "auto":
        if requested not in DTYPES:
            raise DeviceError(f"unknown --dtype {requested!r}; use auto, bf16, fp16 or fp32")
        if requested == "bf16" and device_type == "cuda" and not torch.cuda.is_bf16_supported():
            raise DeviceError("--dtype bf16 is not supported by this GPU; use --dtype fp16 (with grad scaling) or fp32")
        return requested
    if device_type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if device_type == "mps":
        macos14 = getattr(torch.backends.mps, "is_macos_or_newer", lambda *a: False)(14, 0)
        return "bf16" if macos14 else "fp32"
    return "fp32"


def synchronize(device):
    """Wait for the device's queued work (timing); nothing to wait for on the CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def autocast(device_type, dtype):
    """Mixed precision for the forward pass; fp32 runs without autocast."""
    if dtype == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device_type, dtype=DTYPES[dtype])


def choose_loss(requested, loss_chunk_rows, device):
    """--fused_loss auto|on|off and --loss_chunk_rows -> (one of LOSSES, one line saying what and why).
    "on" where the Triton kernels cannot run, or together with chunking, is a DeviceError."""
    usable, why_not = triton_loss.available(device)
    if requested == "on" and not usable:
        raise DeviceError(f"--fused_loss on: {why_not}; use --fused_loss off")
    if requested == "on" and loss_chunk_rows:
        raise DeviceError("--fused_loss on and --loss_chunk_rows are two ways to compute the loss; drop one of them")
    if loss_chunk_rows:
        return "chunked", f"loss: chunked, {loss_chunk_rows} rows at a time (--loss_chunk_rows)"
    if requested == "on" or (requested == "auto" and usable):
        how = "--fused_loss on" if requested == "on" else "--fused_loss auto on CUDA"
        return "fused", f"loss: Triton kernels, the gradient overwrites the logits ({how})"
    why = "--fused_loss off" if requested == "off" else f"--fused_loss auto: {why_not}"
    return "torch", f"loss: PyTorch cross-entropy ({why})"


# -----------------------------------------------------------------------------
# torch.compile with a fallback chain.


def compile_chain(mode):
    """Modes to try in order: the asked-for one, then default, then eager (no compile)."""
    if mode in (None, False, "none", "eager"):
        return ["eager"]
    if mode not in COMPILE_MODES:
        raise DeviceError(f"unknown --compile mode {mode!r}; use {', '.join(COMPILE_MODES)} or none")
    return [mode] + (["default"] if mode != "default" else []) + ["eager"]


def compile_model(model, device_type, mode="default", trial=None, wrap=None, parts=None):
    """torch.compile down the chain of compile_chain(mode); returns (model to train, mode used).
    parts: compile these submodules in place instead of the whole model (FSDP: each sharded
    block, whose hooks then run between the compiled blocks).

    torch.compile is lazy: most failures (no C compiler or Triton, an op the backend lacks, a
    CUDA-graph problem) surface only at the first call. So each mode is checked with trial(model),
    one training-shaped forward and backward, and the first mode that works on every rank is
    used. wrap (DDP) is applied before the trial, so the trial compiles the graphs training runs.
    Each failure prints one line naming the mode that failed and the one tried next. Running out
    of memory is not a compile failure: it is raised."""
    wrap = wrap or (lambda m: m)
    chain = compile_chain(mode)
    for i, candidate in enumerate(chain[:-1]):
        compiled, error, t0 = None, None, time.perf_counter()
        options = {} if candidate == "default" else {"mode": candidate}
        try:
            if parts is None:
                compiled = torch.compile(model, **options)
            else:
                for part in parts:
                    part.compile(**options)
                compiled = model
        except Exception as exc:  # any compile failure falls back; the run goes on
            error = exc
        # DDP's constructor is a collective: the ranks agree that compile worked before any of them wraps.
        if not distributed.agree(error is not None, "max"):
            try:
                compiled = wrap(compiled)
                if trial is not None:
                    trial(compiled)
            except Exception as exc:
                if is_oom(exc):
                    raise  # not a compile problem, and eager needs more memory still: the caller explains
                error = exc
            finally:
                model.zero_grad(set_to_none=True)  # the trial's gradients must not reach the first step
            if not distributed.agree(error is not None, "max"):
                if trial is not None:
                    cli.log(f"compile: mode {candidate} compiled and checked on one micro batch in {time.perf_counter() - t0:.1f} s")
                return compiled, candidate
        reason = f"{type(error).__name__}: {_first_line(error)}" if error else "it failed on another rank"
        cli.log(f"compile: mode {candidate} failed on {device_type} ({reason}); using {chain[i + 1]}")
        compiled = error = None
        for part in parts or []:
            part._compiled_call_impl = None  # back to eager, as nn.Module.compile() left it
        with contextlib.suppress(Exception):
            torch._dynamo.reset()  # drop the failed mode's cached graphs
    return wrap(model), "eager"


def _first_line(exc, limit=200):
    line = (str(exc).strip().splitlines() or [""])[0]
    return line if len(line) <= limit else line[:limit] + "..."


def forward_backward(model, batch_size, seq_len, device, dtype, vocab_size=50257):
    """One forward and backward pass on random tokens, shaped like a training micro batch
    (contiguous int64 (B, T) inputs, so a compiled model does not recompile for the real ones).
    Gradients are not synchronised across DDP ranks; the caller clears them."""
    gen = torch.Generator().manual_seed(0)  # its own generator: the training RNG streams are untouched
    x = torch.randint(0, vocab_size, (batch_size, seq_len), generator=gen).to(device)
    y = torch.randint(0, vocab_size, (batch_size, seq_len), generator=gen).to(device)
    with model.no_sync() if hasattr(model, "no_sync") else contextlib.nullcontext():
        with autocast(device.type, dtype):
            _, loss = model(x, y)
        loss.backward()


# -----------------------------------------------------------------------------
# Memory: the largest micro batch that fits, statistics, out-of-memory errors.


def is_oom(exc):
    """CUDA raises torch.OutOfMemoryError; MPS may raise a plain RuntimeError saying so."""
    return isinstance(exc, torch.OutOfMemoryError) or (isinstance(exc, RuntimeError) and "out of memory" in str(exc))


def free_memory(device):
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    elif device.type == "mps":
        torch.mps.empty_cache()


def fits(model, batch_size, seq_len, device, dtype):
    """True if a forward and backward pass of batch_size sequences runs without running out of memory.
    Frees what the pass left (gradients, cached blocks) either way, ready for the next try."""
    try:
        forward_backward(model, batch_size, seq_len, device, dtype)
        ok = True
    except Exception as exc:
        if not is_oom(exc):
            raise
        ok = False  # leaving the except block drops the traceback, and with it the activations
    model.zero_grad(set_to_none=True)
    free_memory(device)
    return ok


def find_micro_batch_size(try_batch, candidates, start):
    """The largest of `candidates` for which try_batch(b) is True, or None if none is.

    From the largest candidate <= start: double while it fits, or halve while it does not, then
    bisect between the largest size that fitted and the smallest that did not. Assumes a size
    fits whenever a larger one does; each size is tried at most once."""
    candidates = sorted(candidates)
    n = len(candidates)
    i = max(bisect.bisect_right(candidates, start) - 1, 0)  # the largest candidate <= start
    fit, fail = (i, n) if try_batch(candidates[i]) else (-1, i)  # -1 and n: no size known to fit, to fail
    while fail == n and fit < n - 1:  # double while it fits
        j = min(bisect.bisect_left(candidates, 2 * candidates[fit]), n - 1)  # the first >= twice fit's size
        fit, fail = (j, fail) if try_batch(candidates[j]) else (fit, j)
    while fit < 0:  # halve while it does not
        j = bisect.bisect_right(candidates, candidates[fail] // 2) - 1  # -1: every candidate is larger
        if j < 0:
            return None
        fit, fail = (j, fail) if try_batch(candidates[j]) else (fit, j)
    while fail - fit > 1:  # then bisect
        mid = (fit + fail) // 2
        fit, fail = (mid, fail) if try_batch(candidates[mid]) else (fit, mid)
    return candidates[fit]


def auto_micro_batch_size(make_model, tokens_per_rank, seq_len, device, dtype, start=8):
    """--micro_batch_size auto: the largest micro batch that fits, among those that divide the
    sequences each rank processes per optimizer step (so the token batch stays exact).

    CUDA and MPS: probed with real forward and backward passes on a throwaway model, eager (a
    compiled model needs less memory, so what fits eager fits compiled), while holding memory for
    AdamW's two moments, which the first optimizer step allocates. All ranks take the smallest
    answer. CPU: host memory does not fail cleanly (the OS swaps or kills), so nothing is probed.
    Returns (micro batch size, one line saying how it was chosen)."""
    sequences = tokens_per_rank // seq_len
    candidates = [b for b in range(1, sequences + 1) if sequences % b == 0]
    if device.type == "cpu":
        chosen = max(b for b in candidates if b <= max(start, 1))
        return chosen, f"micro batch auto: {chosen} (cpu: host memory is not probed; the largest divisor of {sequences} up to {start})"
    with device:  # build on the device: faster than on the CPU for large models
        model = make_model().to(device)
    param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    adam_moments = torch.empty(2 * param_bytes, dtype=torch.uint8, device=device)
    tried = []

    def try_batch(b):
        tried.append(b)
        return fits(model, b, seq_len, device, dtype)

    chosen = find_micro_batch_size(try_batch, candidates, start)
    del model, adam_moments
    free_memory(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)  # the step log's peak is training's, not the probe's
    chosen = distributed.agree(chosen or 0, "min")
    if chosen == 0:
        raise DeviceError(f"the model does not fit on {device} even at micro batch size 1 x {seq_len} tokens; "
                          "try --activation_checkpointing, a shorter --seq_len or a smaller --model")
    return chosen, (f"micro batch auto: {chosen} (probed on {device}: tried {', '.join(map(str, tried))}; "
                    f"divisors of {sequences} sequences per rank per step)")


_mps_peak = [0]


def memory_stats(device):
    """Device memory in GiB: allocated by tensors, reserved by the allocator, peak allocated since
    start (on MPS: the largest allocation seen at these calls). {} on CPU."""
    gib = 2**30
    if device.type == "cuda":
        # One read of the caching allocator's host-side counters (no device sync); memory_allocated,
        # memory_reserved and max_memory_allocated would each build this whole dict again.
        stats = torch.cuda.memory_stats(device)
        return {"mem_alloc_gib": stats.get("allocated_bytes.all.current", 0) / gib,
                "mem_reserved_gib": stats.get("reserved_bytes.all.current", 0) / gib,
                "mem_peak_gib": stats.get("allocated_bytes.all.peak", 0) / gib}
    if device.type == "mps":
        allocated = torch.mps.current_allocated_memory()
        _mps_peak[0] = max(_mps_peak[0], allocated)
        return {"mem_alloc_gib": allocated / gib, "mem_reserved_gib": torch.mps.driver_allocated_memory() / gib,
                "mem_peak_gib": _mps_peak[0] / gib}
    return {}


def oom_message(device, micro_batch_size, seq_len, activation_checkpointing):
    """What ran out of memory and what to try, for the error line."""
    stats = memory_stats(device)
    used = f" ({stats['mem_peak_gib']:.1f} GiB peak allocated)" if stats else ""
    fixes = []
    if isinstance(micro_batch_size, int) and micro_batch_size > 1:
        fixes.append(f"--micro_batch_size {micro_batch_size // 2} (gradient accumulation keeps --total_batch_size)")
    fixes.append("--micro_batch_size auto (the largest that fits)")
    if not activation_checkpointing:
        fixes.append("--activation_checkpointing (about 1/3 more compute, far less memory)")
    fixes.append("a smaller --model or --seq_len")
    return (f"out of memory on {device} at micro batch size {micro_batch_size} x {seq_len} tokens{used}; "
            f"try {', or '.join(fixes)}")


# -----------------------------------------------------------------------------
# python device.py: the report people ask for in bug reports.


def report(requested="auto"):
    """What this machine has and what training would use."""
    cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    lines = [f"python {sys.version.split()[0]}, torch {torch.__version__}",
             f"CUDA: built {torch.backends.cuda.is_built()}, runtime {torch.version.cuda}, cuDNN {cudnn}, "
             f"GPUs visible {torch.cuda.device_count() if torch.cuda.is_available() else 0}"]
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            lines.append(f"  GPU {i}: {p.name}, {p.total_memory / 2**30:.1f} GiB, compute capability {p.major}.{p.minor}")
    mps = torch.backends.mps.is_available()
    lines.append(f"MPS: built {torch.backends.mps.is_built()}, available {mps}"
                 + (f", recommended working set {torch.mps.recommended_max_memory() / 2**30:.1f} GiB" if mps else ""))
    lines.append(f"CPU: {os.cpu_count()} logical cores, torch uses {torch.get_num_threads()} threads")
    chosen = select_device(requested)
    preset = ", ".join(f"{k} {v}" for k, v in PRESETS[chosen].items())
    lines.append(f"would train on: {chosen} (--device {requested}), precision {resolve_dtype(chosen)}")
    lines.append(f"  preset {chosen}: {preset}")
    preset_compile = PRESETS[chosen]["compile"]
    lines.append(f"  compile: preset {preset_compile}: {' -> '.join(compile_chain(preset_compile))}; "
                 f"--compile max-autotune: {' -> '.join(compile_chain('max-autotune'))}")
    lines += ["  " + line for line in apply_device_settings(chosen)]
    return "\n".join(lines)


def run(argv=None):
    parser = cli.ArgumentParser(description="Print what this machine has and what train_gpt2.py would use on it.")
    add_device_arguments(parser, dtype=False)
    print(report(parser.parse_args(argv).device))


if __name__ == "__main__":
    sys.exit(cli.main(run))
