"""The project's small command lines, a package so that they import the repository's modules without
editing sys.path. Run each from the repository root as a module:

    python -m scripts.prepare_data --source tinyshakespeare
    python -m scripts.sample --checkpoint log/model_00300.pt
    torchrun --nproc_per_node=2 -m scripts.benchmark --model gpt2

Started as a path instead (python scripts/sample.py ...), a script prints that command and exits 2
(_as_module.py). The shell presets (start_*.sh) run as they are.
"""
