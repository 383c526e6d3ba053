"""scripts/bench_compression.py, the measurement behind docs/PERFORMANCE.md's checkpoint compression figures:
each method gives the checkpoint back bit for bit, and the table says how much each one saved."""
import numpy as np

from conftest import load_script, run_main

bench = load_script("bench_compression.py")


def test_byte_planes_are_a_permutation_that_undoes_itself():
    data = np.random.default_rng(0).integers(0, 256, 4 * 1000 + 3, dtype=np.uint8).tobytes()  # a tail of 3
    planes = bench.to_planes(data)
    assert planes != data and sorted(planes) == sorted(data)
    assert planes[:1000] == data[0:4000:4]  # byte 0 of every word first
    assert bench.from_planes(planes) == data


def test_the_table_measures_a_trained_checkpoint_and_every_method_round_trips(tiny_data, capsys):
    methods = ["torch.save", "deflate-1"]
    try:
        bench.import_zstandard()
        methods += ["zstd-1", "zstd-1-planes"]
    except bench.cli.UsageError:
        pass  # zstandard is only for the measurement: the zip rows still run
    assert run_main(bench.main, ["--model", "d2", "--steps", "1", "--seq_len", "32", "--repeats", "1",
                                 "--data_root", tiny_data, "--methods", *methods]) == 0
    out = capsys.readouterr().out
    assert "every method checked bit for bit" in out
    sizes = {line.split()[0]: float(line.split()[1].replace(",", "")) for line in out.splitlines()
             if line.split() and line.split()[0] in methods}
    assert set(sizes) == set(methods)
    assert all(sizes[name] < sizes["torch.save"] for name in methods[1:])  # each compresses something
    assert "weights only (--save_optimizer latest)" in out and "bf16 export (weights only)" in out
    assert run_main(bench.main, ["--methods", "gzip"]) == 2  # named before any training


def test_a_changed_tensor_is_not_the_same_checkpoint():
    import torch

    state = {"model": {"w": torch.ones(4)}, "step": 3}
    assert bench.same_tensors(state, {"model": {"w": torch.ones(4)}, "step": 3})
    assert not bench.same_tensors(state, {"model": {"w": torch.tensor([1.0, 1.0, 1.0, 1.0 + 2**-23])}, "step": 3})
    assert not bench.same_tensors(state, {"model": {"w": torch.ones(4)}, "step": 4})
    assert bench.same_tensors({"x": torch.tensor(float("nan"))}, {"x": torch.tensor(float("nan"))})
