"""Token files as other trainers leave them: nanoGPT's train.bin / val.bin and llm.c's (modded-nanogpt's)
headered .bin shards read like the .npy shards, with the same windows, resume and world-size independence."""
import numpy as np
import pytest
import torch

import train_gpt2
from conftest import read_metrics, run_main
from dataloader import ShardedDataLoader
from shards import LLMC_MAGIC, DataError, find_token_files, shard_path, write_shard

B, T = 2, 4
FORMATS = ["npy", "nanogpt", "llm.c"]


def write_llmc(path, tokens, magic=LLMC_MAGIC, version=1, count=None):
    """As llm.c's dev/data scripts write a shard: 256 int32 (magic, version, token count), then uint16 tokens."""
    header = np.zeros(256, dtype=np.int32)
    header[:3] = magic, version, len(tokens) if count is None else count
    path.write_bytes(header.tobytes() + np.asarray(tokens, dtype=np.uint16).tobytes())


def write_split(folder, fmt, split, parts):
    """parts (token arrays) as split's files of one format: nanoGPT's has one file, so one part."""
    folder.mkdir(parents=True, exist_ok=True)
    for index, tokens in enumerate(parts):
        if fmt == "npy":
            write_shard(shard_path(folder, "tiny", split, index), tokens)
        elif fmt == "llm.c":
            write_llmc(folder / f"tiny_{split}_{index:06d}.bin", tokens)
        else:
            assert len(parts) == 1
            np.asarray(tokens, dtype=np.uint16).tofile(folder / f"{split}.bin")  # as nanoGPT's prepare.py does


def stream(n, seed=0):
    return np.random.default_rng(seed).integers(0, 50257, n).astype(np.uint16)


@pytest.mark.parametrize("fmt", ["nanogpt", "llm.c"])
def test_batches_equal_those_of_the_same_tokens_as_npy_shards_for_two_ranks_and_a_resume(tmp_path, fmt):
    tokens = stream(300)
    parts = [tokens] if fmt == "nanogpt" else [tokens[:170], tokens[170:]]  # llm.c: two shards, a boundary
    write_split(tmp_path / "npy", "npy", "train", parts)
    write_split(tmp_path / fmt, fmt, "train", parts)
    assert [f.format for f in find_token_files(tmp_path / fmt, "train")] == [fmt] * len(parts)

    def ranks(folder):
        return [ShardedDataLoader(folder, "train", B, T, rank=r, world_size=2) for r in range(2)]

    reference, other = ranks(tmp_path / "npy"), ranks(tmp_path / fmt)
    for _ in range(20):  # past the shard boundary and the wrap: 18 steps of 16 tokens an epoch
        for ref, loader in zip(reference, other):
            (x, y), (ox, oy) = ref.next_batch(), loader.next_batch()
            assert torch.equal(x, ox) and torch.equal(y, oy)
    state = other[0].state_dict()
    assert state["epoch"] == 1 and state["shards"] == [f.name for f in find_token_files(tmp_path / fmt, "train")]

    single = ShardedDataLoader(tmp_path / fmt, "train", B, T)  # world size 1 continues the two ranks' stream
    single.load_state_dict(state)
    for _ in range(3):
        for ref in reference:
            assert torch.equal(ref.next_batch()[0], single.next_batch()[0])


def test_a_short_training_run_has_the_same_losses_on_each_format(tmp_path):
    """The trainer reads each folder as it is, and the losses are those of the same tokens as .npy shards."""
    tokens = stream(12_000, seed=1)
    losses = {}
    for fmt in FORMATS:
        for split, part in (("train", tokens[:10_000]), ("val", tokens[10_000:])):
            write_split(tmp_path / fmt, fmt, split, [part])
        args = ["--model", "d2", "--n_layer", "1", "--n_embd", "64", "--n_head", "2", "--block_size", "32",
                "--seq_len", "16", "--micro_batch_size", "2", "--total_batch_size", "64", "--max_steps", "3",
                "--warmup_steps", "1", "--eval_interval", "2", "--eval_steps", "1", "--generate_interval", "0",
                "--num_threads", "1", "--device", "cpu", "--data_root", tmp_path / fmt,
                "--log_dir", tmp_path / f"log_{fmt}"]
        assert run_main(train_gpt2.main, args) == 0, fmt
        losses[fmt] = [(r["step"], r.get("loss"), r.get("val_loss")) for r in read_metrics(tmp_path / f"log_{fmt}")
                       if "loss" in r or "val_loss" in r]
    assert len(losses["npy"]) >= 4 and losses["nanogpt"] == losses["npy"] and losses["llm.c"] == losses["npy"]


@pytest.mark.parametrize("make, message", [
    (lambda d: write_llmc(d / "x_train_000000.bin", stream(100), magic=1234),
     "x_train_000000.bin is not an llm.c token file: its header starts with 1234, not the magic number 20240520"),
    (lambda d: write_llmc(d / "x_train_000000.bin", stream(100), version=2),
     "x_train_000000.bin is llm.c token file version 2; this loader reads version 1 (GPT-2's uint16 tokens)"),
    (lambda d: write_llmc(d / "x_train_000000.bin", stream(100), count=120),
     "x_train_000000.bin is cut short: its header says 120 tokens (1,264 bytes) but the file has 1,224 bytes"),
    (lambda d: write_llmc(d / "x_train_000000.bin", stream(100), count=80),
     "x_train_000000.bin is longer than its header says: its header says 80 tokens"),
    (lambda d: (d / "x_train_000001.bin").write_bytes(b"\0" * 100),
     "x_train_000001.bin has 100 bytes, less than llm.c's 1,024-byte header"),
    (lambda d: (d / "train.bin").write_bytes(b"\1" * 201),
     "train.bin has 201 bytes, not a whole number of uint16 tokens"),
    (lambda d: write_llmc(d / "train.bin", stream(100)),
     "train.bin starts with llm.c's header (magic 20240520), not with tokens as nanoGPT's train.bin does; name it "
     "like llm.c's shards (e.g. data_train_000000.bin)"),
    (lambda d: (d / "train.bin").write_bytes(b""), "train.bin is empty (0 tokens)"),
    (lambda d: (write_shard(shard_path(d, "x", "train", 0), stream(100)),
                write_llmc(d / "x_train_000001.bin", stream(9))),
     "holds train tokens in 2 formats (x_train_000000.npy and x_train_000001.bin); which to read is not clear"),
])
def test_a_bad_or_ambiguous_token_file_is_one_message_naming_it(tmp_path, make, message):
    make(tmp_path)
    with pytest.raises(DataError) as error:
        ShardedDataLoader(tmp_path, "train", B, T)
    assert message in str(error.value)


def test_llmc_names_without_an_index_and_datasets_named_like_a_split(tmp_path):
    """llm.c's tiny Shakespeare is tiny_shakespeare_{train,val}.bin; books_val_train_000000.bin is train, not val."""
    write_llmc(tmp_path / "tiny_shakespeare_val.bin", stream(50))
    write_llmc(tmp_path / "books_val_train_000000.bin", stream(50))
    assert [f.name for f in find_token_files(tmp_path, "val")] == ["tiny_shakespeare_val.bin"]
    assert [f.name for f in find_token_files(tmp_path, "train")] == ["books_val_train_000000.bin"]


def test_the_vocabulary_check_and_fingerprints_cover_every_format(tmp_path):
    bad = stream(100)
    bad[70] = 50300
    write_llmc(tmp_path / "x_train_000000.bin", bad)
    with pytest.raises(DataError, match=r"x_train_000000\.bin holds token id 50,300 at token 70 .* llm\.c"):
        ShardedDataLoader(tmp_path, "train", B, T)
    (tmp_path / "x_train_000000.bin").unlink()
    write_split(tmp_path, "nanogpt", "train", [stream(100)])
    state = ShardedDataLoader(tmp_path, "train", B, T).state_dict()
    assert state["shards"] == ["train.bin"] and state["shard_tokens"] == [100] and len(state["fingerprints"]) == 1
