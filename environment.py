"""Environment variables torch reads only once, set before torch loads.

torch reads PYTORCH_ENABLE_MPS_FALLBACK when it loads, and the allocator settings when CUDA / MPS
first allocate. So every module of this project that imports torch imports this module before
it (tests/test_layout.py checks each module and each command line), and the variables are in
place whichever module a command starts from. A variable the user set is never changed.

    LINES      {"cuda": [...], "mps": [...]}: what was set and why, one line each, for the run's log
"""
import os
import sys


def _torch_version():
    """(major, minor) of the installed torch, read without importing it; (0, 0) if unknown."""
    from importlib import metadata

    try:
        major, minor = metadata.version("torch").split(".")[:2]
        return int(major), int(minor)
    except (metadata.PackageNotFoundError, ValueError):
        return (0, 0)


def _set_defaults():
    torch_loaded = "torch" in sys.modules
    lines = {"cuda": [], "mps": []}

    def setdefault(device_type, name, value, why):
        if name in os.environ:
            lines[device_type].append(f"{device_type}: {name}={os.environ[name]} (from your environment)")
            return
        os.environ[name] = value
        late = " (torch was imported first: export it before starting python)" if torch_loaded and "FALLBACK" in name else ""
        lines[device_type].append(f"{device_type}: {name}={value}: {why}{late}")

    # Segments that grow in place instead of fixed blocks: less fragmentation, so larger micro batches fit.
    # torch 2.9 renamed PYTORCH_CUDA_ALLOC_CONF to PYTORCH_ALLOC_CONF (the old name still works, with a warning).
    alloc_names = ("PYTORCH_ALLOC_CONF", "PYTORCH_CUDA_ALLOC_CONF")
    users = [name for name in alloc_names if name in os.environ]
    name = users[0] if users else alloc_names[0] if _torch_version() >= (2, 9) else alloc_names[1]
    setdefault("cuda", name, "expandable_segments:True", "less allocator fragmentation")
    setdefault("mps", "PYTORCH_ENABLE_MPS_FALLBACK", "1", "ops MPS lacks run on the CPU instead of failing")
    # MPS's default ceiling is 1.7x the GPU's recommended working set, where macOS swaps and a step
    # takes minutes. At 1.0 an oversize batch fails at once with an out-of-memory error, which
    # --micro_batch_size auto and the error message can act on. The low mark must stay below the high.
    watermarks = ("PYTORCH_MPS_HIGH_WATERMARK_RATIO", "PYTORCH_MPS_LOW_WATERMARK_RATIO")
    users = [name for name in watermarks if name in os.environ]
    lines["mps"] += [f"mps: {name}={os.environ[name]} (from your environment)" for name in users]
    if not users:
        os.environ["PYTORCH_MPS_LOW_WATERMARK_RATIO"] = "0.8"
        setdefault("mps", "PYTORCH_MPS_HIGH_WATERMARK_RATIO", "1.0",
                   "allocations stop at the recommended working set (low mark 0.8): out of memory instead of swapping")
    return lines


LINES = _set_defaults()
