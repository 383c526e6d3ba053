"""Devices: pick CUDA > Apple MPS > CPU, apply per-device settings, compile with fallbacks.

Public API:
    PRESETS                              per-device defaults (micro batch, dtype, compile) for --preset
    select_device(requested)             -> "cuda" | "mps" | "cpu"   (DeviceError if asked-for device is missing)
    torch_device(device_type, local_rank)-> torch.device for this process
    apply_device_settings(device_type)   -> list of one-line descriptions of what was set
    resolve_dtype(device_type, requested)-> "bf16" | "fp16" | "fp32"
    autocast(device_type, dtype)         -> context manager for the forward pass
    compile_model(model, device_type, mode) -> (model, used_mode)
    peak_flops(device, dtype)            -> datasheet peak FLOP/s for MFU, or None

`python device.py` prints a report of what this machine has and what would be chosen.
"""
import contextlib
import os
import sys

import torch

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}

# Per-device defaults that do not change the math: how the work is laid out and run.
# They only fill flags the user did not give (train_gpt2.resolve_settings).
PRESETS = {
    "cuda": dict(micro_batch_size=64, dtype="auto", compile="none"),
    "mps": dict(micro_batch_size=8, dtype="auto", compile="none"),
    "cpu": dict(micro_batch_size=8, dtype="fp32", compile="none"),
}


class DeviceError(Exception):
    """The asked-for device or setting cannot be used here; the message names the fix."""


def mps_available():
    return getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()


def select_device(requested="auto"):
    """CUDA if present, else Apple MPS, else CPU; an explicit request must exist."""
    if requested == "auto":
        if torch.cuda.is_available():
            return "cuda"
        if mps_available():
            return "mps"
        return "cpu"
    if requested == "cuda" and not torch.cuda.is_available():
        built = "was" if torch.backends.cuda.is_built() else "was NOT"
        raise DeviceError(
            f"--device cuda was asked for but no CUDA GPU is visible (this torch {torch.__version__} {built} "
            "built with CUDA). Check `nvidia-smi` and CUDA_VISIBLE_DEVICES, install a CUDA build of torch, "
            "or use --device auto")
    if requested == "mps" and not mps_available():
        built = torch.backends.mps.is_built() if hasattr(torch.backends, "mps") else False
        raise DeviceError(
            f"--device mps was asked for but Apple MPS is not available (torch built with MPS: {built}; "
            "MPS needs an Apple-silicon Mac with macOS 12.3+). Use --device auto or --device cpu")
    if requested not in ("cuda", "mps", "cpu"):
        raise DeviceError(f"unknown --device {requested!r}; use auto, cuda, mps or cpu")
    return requested


def torch_device(device_type, local_rank=0):
    if device_type == "cuda":
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device(device_type)


def apply_device_settings(device_type, num_threads=None):
    """Speed settings that are safe for training; returns what was set, one line each."""
    applied = []
    if device_type == "cuda":
        # TF32 matmuls for any fp32 work left outside autocast: ~8x the fp32 rate, ample precision for training.
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
        applied.append("cuda: TF32 matmuls on, cudnn.benchmark on")
    if device_type == "cpu" and num_threads:
        torch.set_num_threads(num_threads)
    if device_type == "cpu":
        applied.append(f"cpu: {torch.get_num_threads()} threads")
    return applied


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


def autocast(device_type, dtype):
    """Mixed precision for the forward pass; fp32 runs without autocast."""
    if dtype == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device_type, dtype=DTYPES[dtype])


def compile_model(model, device_type, mode="default"):
    """torch.compile with one line on failure; returns (model, the mode used or 'eager')."""
    if mode in (None, "none", "eager", False):
        return model, "eager"
    try:
        return torch.compile(model, mode=None if mode == "default" else mode), mode
    except Exception as exc:  # a compile failure must not stop a training run
        print(f"torch.compile(mode={mode}) failed on {device_type} ({type(exc).__name__}: {exc}); running eager")
        return model, "eager"


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
    name = torch.cuda.get_device_name(device)
    for key, rates in PEAK_FLOPS.items():  # ordered: specific names before their family
        if key in name:
            return rates.get(dtype)
    return None


def report():
    """What this machine has and what training would use: the report people ask for in bug reports."""
    lines = [f"python {sys.version.split()[0]}, torch {torch.__version__}"]
    lines.append(f"CUDA built: {torch.backends.cuda.is_built()}, CUDA runtime: {torch.version.cuda}, "
                 f"cuDNN: {torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None}")
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            lines.append(f"  GPU {i}: {p.name}, {p.total_memory / 2**30:.1f} GiB, compute capability {p.major}.{p.minor}")
    else:
        lines.append("  no CUDA GPU visible")
    built = torch.backends.mps.is_built() if hasattr(torch.backends, "mps") else False
    lines.append(f"MPS built: {built}, available: {mps_available()}")
    chosen = select_device("auto")
    lines.append(f"would train on: {chosen}, precision {resolve_dtype(chosen)}")
    return "\n".join(lines)


if __name__ == "__main__":
    print(report())
