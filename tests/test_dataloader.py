"""The shard format and ShardedDataLoader: what training, DDP and exact resume rely on."""
import re
import threading

import numpy as np
import pytest
import torch

from dataloader import ShardedDataLoader, data_change
from shards import DataError, find_token_files, get_tokenizer, shard_path, write_shard

B, T = 2, 4  # one window is B*T = 8 tokens; a step with 2 ranks needs 2*8+1 = 17


def make_shards(data_dir, lengths, split="train", name="tiny"):
    """Shards whose tokens count up across shards, so every token in the stream is unique."""
    start = 0
    shards = []
    for index, length in enumerate(lengths):
        shards.append(np.arange(start, start + length, dtype=np.uint16))
        write_shard(shard_path(data_dir, name, split, index), shards[-1])
        start += length
    return shards


def batches(loader, steps):
    return [loader.next_batch() for _ in range(steps)]


def test_batch_is_int64_window_and_its_shift(tmp_path):
    tokens = np.array([65535, 50256, 40000, 0, 1, 2, 32768, 7, 8, 9] * 3, dtype=np.uint16)
    write_shard(shard_path(tmp_path, "tiny", "train", 0), tokens)
    x, y = ShardedDataLoader(tmp_path, "train", B, T, vocab_size=2**16).next_batch()
    assert x.dtype == y.dtype == torch.int64 and x.shape == y.shape == (B, T)
    # uint16 values above 32767 must come through unsigned, not wrapped negative
    assert x.flatten().tolist() == tokens[: B * T].astype(np.int64).tolist()
    assert y.flatten().tolist() == tokens[1 : B * T + 1].astype(np.int64).tolist()


@pytest.mark.parametrize("prefetch", [False, True])
def test_two_ranks_read_disjoint_windows_that_one_rank_reads_in_two_calls(tmp_path, prefetch):
    make_shards(tmp_path, [100])
    rank0 = ShardedDataLoader(tmp_path, "train", B, T, rank=0, world_size=2, prefetch=prefetch)
    rank1 = ShardedDataLoader(tmp_path, "train", B, T, rank=1, world_size=2, prefetch=prefetch)
    single = ShardedDataLoader(tmp_path, "train", B, T)  # world 1, 2 grad-accumulation calls
    for _ in range(3):
        (x0, y0), (x1, y1) = rank0.next_batch(), rank1.next_batch()
        assert not set(x0.flatten().tolist()) & set(x1.flatten().tolist())
        (xa, ya), (xb, yb) = single.next_batch(), single.next_batch()
        assert torch.equal(x0, xa) and torch.equal(y0, ya)
        assert torch.equal(x1, xb) and torch.equal(y1, yb)
    assert rank0.state_dict() == rank1.state_dict() == single.state_dict()


@pytest.mark.parametrize("prefetch", [False, True])
def test_moves_to_next_shard_then_wraps_to_first_with_epoch(tmp_path, prefetch):
    shard0, shard1 = make_shards(tmp_path, [50, 35])
    loader = ShardedDataLoader(tmp_path, "train", B, T, prefetch=prefetch)
    starts = []
    for _ in range(11):
        state = loader.state_dict()
        x, _ = loader.next_batch()
        shard = (shard0, shard1)[state["shard_index"]]
        assert x.flatten().tolist() == shard[state["position"] : state["position"] + B * T].tolist()
        starts.append((state["epoch"], state["shard_index"], state["position"]))
    # shard 0 (50 tokens) fits 6 windows of 8+1, shard 1 (35 tokens) fits 4; then epoch 1
    assert starts == [(0, 0, p) for p in range(0, 48, 8)] + [(0, 1, p) for p in range(0, 32, 8)] + [(1, 0, 0)]
    assert loader.state_dict()["epoch"] == 1


@pytest.mark.parametrize("prefetch", [False, True])
def test_state_round_trips_through_a_weights_only_checkpoint(tmp_path, prefetch):
    make_shards(tmp_path / "data", [50, 35, 40])
    loader = ShardedDataLoader(tmp_path / "data", "train", B, T, prefetch=prefetch)
    batches(loader, 5)
    torch.save({"loader": loader.state_dict()}, tmp_path / "ckpt.pt")
    state = torch.load(tmp_path / "ckpt.pt", weights_only=True)["loader"]
    assert set(state) >= {"shard_index", "position", "epoch", "shards"}

    resumed = ShardedDataLoader(tmp_path / "data", "train", B, T, prefetch=prefetch)
    resumed.load_state_dict(state)
    # 6 + 4 + 4 windows per epoch: 20 more steps cross both shard boundaries and the wrap
    for (x, y), (rx, ry) in zip(batches(loader, 20), batches(resumed, 20)):
        assert torch.equal(x, rx) and torch.equal(y, ry)
    assert resumed.state_dict() == loader.state_dict()
    assert resumed.state_dict()["epoch"] == 1


def test_reset_goes_back_to_the_very_start(tmp_path):
    make_shards(tmp_path, [50, 35])
    loader = ShardedDataLoader(tmp_path, "train", B, T)
    first = loader.next_batch()
    batches(loader, 12)
    loader.reset()
    assert loader.state_dict()["epoch"] == 0
    assert torch.equal(loader.next_batch()[0], first[0])


@pytest.mark.parametrize("prefetch", [False, True])
@pytest.mark.parametrize("world_size_after", [1, 4])
def test_resume_with_another_world_size_neither_repeats_nor_skips(tmp_path, world_size_after, prefetch):
    (stream,) = make_shards(tmp_path, [400])
    ranks = [ShardedDataLoader(tmp_path, "train", B, T, rank=r, world_size=2, prefetch=prefetch) for r in range(2)]
    read = []
    for _ in range(3):
        for loader in ranks:  # rank order = stream order
            read += loader.next_batch()[0].flatten().tolist()
    state = ranks[0].state_dict()
    assert state == ranks[1].state_dict()  # the state is global: any rank's copy will do

    ranks = [ShardedDataLoader(tmp_path, "train", B, T, rank=r, world_size=world_size_after, prefetch=prefetch)
             for r in range(world_size_after)]
    for loader in ranks:
        loader.load_state_dict(state)
    for _ in range(4):
        for loader in ranks:
            read += loader.next_batch()[0].flatten().tolist()
    assert read == stream[: len(read)].tolist()


def test_resumed_position_past_a_shorter_shard_end_moves_on(tmp_path):
    """A state saved with a small step may not leave room for a bigger one: go to the next shard."""
    shard0, shard1 = make_shards(tmp_path, [50, 60])
    small = ShardedDataLoader(tmp_path, "train", B, T)
    batches(small, 5)  # position 40: room for 8+1 more, not for 16+1
    big = ShardedDataLoader(tmp_path, "train", B, T, world_size=2)
    big.load_state_dict(small.state_dict())
    assert big.state_dict()["shard_index"] == 1 and big.state_dict()["position"] == 0
    assert big.next_batch()[0].flatten().tolist() == shard1[: B * T].tolist()


# -----------------------------------------------------------------------------
# Prefetch: one batch read ahead on a thread, never a different stream


def assert_same_batches_and_states(loader, reference, steps):
    for step in range(steps):
        (x, y), (rx, ry) = loader.next_batch(), reference.next_batch()
        assert torch.equal(x, rx) and torch.equal(y, ry), f"step {step}"
        assert loader.state_dict() == reference.state_dict(), f"step {step}"  # returned batches, not the read-ahead


@pytest.mark.parametrize("rank", [0, 1])
def test_prefetch_gives_the_same_batches_and_state_across_shards_and_the_wrap(tmp_path, rank):
    make_shards(tmp_path, [50, 35, 40])  # 2 ranks: 3 + 2 + 2 steps per epoch
    loader = ShardedDataLoader(tmp_path, "train", B, T, rank=rank, world_size=2, prefetch=True)
    reference = ShardedDataLoader(tmp_path, "train", B, T, rank=rank, world_size=2, prefetch=False)
    assert_same_batches_and_states(loader, reference, 16)  # past both boundaries and two wraps
    assert loader.state_dict()["epoch"] == 2
    loader.close()


def test_prefetch_reads_ahead_on_its_own_thread(tmp_path, monkeypatch):
    """Only the first batch, and the first after load_state, are read in the caller's thread."""
    make_shards(tmp_path, [50, 35])
    reads = []  # (read in the caller's thread, position)
    read = ShardedDataLoader._read

    def spy(self, tokens, position):
        reads.append((threading.current_thread() is threading.main_thread(), position))
        return read(self, tokens, position)

    monkeypatch.setattr(ShardedDataLoader, "_read", spy)
    loader = ShardedDataLoader(tmp_path, "train", B, T, prefetch=True)
    start = loader.state_dict()
    batches(loader, 12)
    loader.load_state_dict(start)
    loader.next_batch()
    loader.close()
    assert [position for in_caller, position in reads if in_caller] == [0, 0]
    assert sum(not in_caller for in_caller, _ in reads) >= 11  # steps 2..12 came from the thread


def test_prefetch_is_not_used_after_load_state_or_reset_moves_the_loader(tmp_path):
    """The batch read ahead for (shard 1, position 16) must not answer a resume at (shard 0, 16)."""
    shard0, _ = make_shards(tmp_path, [50, 50])
    loader = ShardedDataLoader(tmp_path, "train", B, T, prefetch=True)
    batches(loader, 2)
    saved = loader.state_dict()
    batches(loader, 6)  # 6 windows fit in shard 0: now at shard 1, position 16, that batch read ahead
    assert (saved["shard_index"], saved["position"]) == (0, 16)
    assert (loader.state_dict()["shard_index"], loader.state_dict()["position"]) == (1, 16)

    loader.load_state_dict(saved)
    assert loader.next_batch()[0].flatten().tolist() == shard0[16:24].tolist()
    reference = ShardedDataLoader(tmp_path, "train", B, T, prefetch=False)
    reference.load_state_dict(loader.state_dict())
    assert_same_batches_and_states(loader, reference, 14)  # into shard 1 and over the wrap

    loader.reset()
    assert loader.next_batch()[0].flatten().tolist() == shard0[:8].tolist()
    loader.close()


def test_state_saved_with_prefetch_resumes_a_fresh_loader_exactly(tmp_path):
    make_shards(tmp_path, [50, 35, 40])
    loader = ShardedDataLoader(tmp_path, "train", B, T, prefetch=True)
    reference = ShardedDataLoader(tmp_path, "train", B, T, prefetch=False)
    assert_same_batches_and_states(loader, reference, 7)  # mid shard 1, with step 8 read ahead
    resumed = ShardedDataLoader(tmp_path, "train", B, T, prefetch=True)
    resumed.load_state_dict(loader.state_dict())
    assert_same_batches_and_states(resumed, reference, 20)
    loader.close()
    resumed.close()


def test_close_stops_the_prefetch_thread_and_the_loader_still_reads(tmp_path):
    (shard,) = make_shards(tmp_path, [50])
    loader = ShardedDataLoader(tmp_path, "train", B, T, prefetch=True)
    before = set(threading.enumerate())
    loader.next_batch()
    (thread,) = set(threading.enumerate()) - before
    assert thread.name.startswith("dataloader-train-prefetch")
    loader.close()
    assert not thread.is_alive()
    assert loader.next_batch()[0].flatten().tolist() == shard[8:16].tolist()
    loader.close()  # twice is fine


def test_prefetch_defaults_to_on_with_pinned_memory_only(tmp_path, monkeypatch):
    make_shards(tmp_path, [50])
    assert ShardedDataLoader(tmp_path, "train", B, T).prefetch is False  # CPU: nothing to overlap with
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # constructing pins nothing yet
    assert ShardedDataLoader(tmp_path, "train", B, T, pin_memory=True).prefetch is True
    assert ShardedDataLoader(tmp_path, "train", B, T, pin_memory=True, prefetch=False).prefetch is False


def test_reads_build_nanogpt_fineweb_layout(tmp_path):
    """edufineweb_val_000000.npy, then edufineweb_train_000001.npy, ..., saved with plain np.save."""
    for index, split in enumerate(["val", "train", "train"]):
        np.save(tmp_path / f"edufineweb_{split}_{index:06d}.npy", np.full(100, index, dtype=np.uint16))
    assert [p.name for p in find_token_files(tmp_path, "train")] == ["edufineweb_train_000001.npy",
                                                               "edufineweb_train_000002.npy"]
    assert ShardedDataLoader(tmp_path, "val", B, T).next_batch()[0].unique().tolist() == [0]
    assert ShardedDataLoader(tmp_path, "train", B, T).next_batch()[0].unique().tolist() == [1]


def test_a_dataset_named_like_a_split_does_not_leak_into_it(tmp_path):
    make_shards(tmp_path, [50], split="train", name="books_val")
    with pytest.raises(DataError, match=r"no val shards in .* \(looked for \*_val_\*\.npy shards"):
        find_token_files(tmp_path, "val")


# -----------------------------------------------------------------------------
# Bad input: each error names the problem, the file or value, and the fix


@pytest.mark.parametrize("make_bad, expected", [
    (lambda d: None, [r"does not exist", r"python -m scripts\.prepare_data --source tinyshakespeare --out_dir"]),
    (lambda d: d.mkdir(), [r"no train shards in .*data \(looked for \*_train_\*\.npy shards \(this project's and "
                           r"build-nanogpt's\), nanoGPT's train\.bin, llm\.c's \*_train_\*\.bin shards\)",
                           r"python -m scripts\.prepare_data"]),
    (lambda d: (d.mkdir(), np.save(d / "x_train_000000.npy", np.zeros(0, np.uint16))),
     [r"x_train_000000\.npy is empty", r"python -m scripts\.prepare_data"]),
    (lambda d: (d.mkdir(), np.save(d / "x_train_000000.npy", np.arange(100, dtype=np.int32))),
     [r"x_train_000000\.npy has dtype int32, expected uint16", r"astype\(np\.uint16\)"]),
    (lambda d: (d.mkdir(), np.save(d / "x_train_000000.npy", np.zeros((10, 10), np.uint16))),
     [r"shape \(10, 10\), expected a 1-D", r"python -m scripts\.prepare_data"]),
    (lambda d: (d.mkdir(), np.save(d / "x_train_000000.npy", np.zeros(16, np.uint16))),
     [r"has 16 tokens but one step needs 17", r"lower --micro_batch_size or --seq_len"]),
    (lambda d: (d.mkdir(), (d / "x_train_000000.npy").write_bytes(b"")),
     [r"x_train_000000\.npy is not a readable \.npy file", r"copy it again, or re-create"]),
])
def test_bad_data_gives_a_message_with_the_fix(tmp_path, make_bad, expected):
    data_dir = tmp_path / "data"
    make_bad(data_dir)
    with pytest.raises(DataError) as error:
        ShardedDataLoader(data_dir, "train", B, T, world_size=2)
    for pattern in expected:
        assert re.search(pattern, str(error.value)), (pattern, str(error.value))


@pytest.mark.parametrize("bad_id, what", [(60000, "beyond the model's embedding"),
                                          (50257, "one of the model's padding rows, which would make the loss "
                                                   "infinite"),
                                          (50303, "one of the model's padding rows")])
def test_a_token_id_outside_the_vocabulary_names_the_shard_and_offset(tmp_path, bad_id, what):
    """Not an IndexError mid-run (60000 in a uint16 shard) nor an inf loss blamed on the LR (the padding rows)."""
    shard0, shard1 = make_shards(tmp_path, [50, 50])
    shard1[30] = shard1[40] = bad_id
    write_shard(shard_path(tmp_path, "tiny", "train", 1), shard1)
    loader = ShardedDataLoader(tmp_path, "train", B, T)  # shard 0 is fine, and read
    batches(loader, 5)
    with pytest.raises(DataError) as error:
        batches(loader, 1)  # the step that opens shard 1
    message = str(error.value)
    assert f"tiny_train_000001.npy holds token id {bad_id:,} at token 30 (the first of those" in message
    assert "the vocabulary has 50,257 ids (0 to 50,256)" in message and what in message
    assert ShardedDataLoader(tmp_path, "train", B, T, vocab_size=None).state_dict()  # the check can be left out


def test_the_first_bad_id_is_found_across_scan_chunks(tmp_path, monkeypatch):
    import shards

    monkeypatch.setattr(shards, "SCAN_TOKENS", 7)
    (shard,) = make_shards(tmp_path, [50])
    shard[23] = 50300
    shard[41] = 61000
    write_shard(shard_path(tmp_path, "tiny", "train", 0), shard)
    first = r"holds token id 50,300 at token 23 \(the first of those; the largest is 61,000\)"
    with pytest.raises(DataError, match=first):
        ShardedDataLoader(tmp_path, "train", B, T)


def test_the_vocabulary_check_reads_each_shard_once(tmp_path, monkeypatch):
    """Each epoch, and each evaluation's reset(), reopens shard 0: its ids are not scanned again."""
    import dataloader

    make_shards(tmp_path, [50, 35])
    checked = []
    monkeypatch.setattr(dataloader, "check_token_ids", lambda path, tokens, vocab: checked.append(path.name))
    loader = ShardedDataLoader(tmp_path, "train", B, T)
    batches(loader, 25)  # 10 windows an epoch: two wraps
    loader.reset()
    assert checked == ["tiny_train_000000.npy", "tiny_train_000001.npy"]


def test_checkpoint_from_other_data_names_the_data_root(tmp_path):
    make_shards(tmp_path / "fineweb", [50, 50])
    make_shards(tmp_path / "shakespeare", [50])
    state = ShardedDataLoader(tmp_path / "fineweb", "train", B, T).state_dict()
    loader = ShardedDataLoader(tmp_path / "shakespeare", "train", B, T)
    with pytest.raises(DataError, match=rf"other data.*--data_root {tmp_path / 'fineweb'}"):
        loader.load_state_dict(state)


def copy_of(folder, to):
    to.mkdir()
    for path in folder.glob("*.npy"):
        (to / path.name).write_bytes(path.read_bytes())
    return to


def test_the_state_records_sizes_and_fingerprints_and_names_what_changed(tmp_path):
    """A --data_root whose shards have the same names used to resume on other text without a word."""
    shard0, shard1 = make_shards(tmp_path / "a", [50, 60])
    loader = ShardedDataLoader(tmp_path / "a", "train", B, T)
    batches(loader, 3)
    state = loader.state_dict()
    assert state["shard_tokens"] == [50, 60] and len(set(state["fingerprints"])) == 2

    moved = copy_of(tmp_path / "a", tmp_path / "moved")  # the same data somewhere else is the same data
    assert data_change(state, moved) is None and ShardedDataLoader(moved, "train", B, T).data_change(state) is None

    other = copy_of(tmp_path / "a", tmp_path / "other")
    shard1[59] += 1  # the same name and size, one token different (at the end, where the fingerprint reads)
    write_shard(shard_path(other, "tiny", "train", 1), shard1)
    change = data_change(state, other)
    assert change == (f"tiny_train_000001.npy in {other} holds other tokens than when the checkpoint was written "
                      f"(in {tmp_path / 'a'}): same name and size, another fingerprint")
    resumed = ShardedDataLoader(other, "train", B, T)
    assert resumed.data_change(state) == change
    resumed.load_state_dict(state)  # the trainer decides whether to go on: the loader itself still resumes
    assert resumed.next_batch()[0].flatten().tolist() == shard0[24:32].tolist()

    write_shard(shard_path(other, "tiny", "train", 1), np.arange(80))
    assert data_change(state, other) == (f"tiny_train_000001.npy in {other} has 80 tokens, but 60 when the "
                                         f"checkpoint was written (in {tmp_path / 'a'})")
    write_shard(shard_path(other, "tiny", "train", 2), np.arange(80))
    assert data_change(state, other).startswith("the checkpoint read 2 shards (tiny_train_000000.npy, "
                                                "tiny_train_000001.npy) from")


def test_a_state_from_before_the_fingerprints_is_compared_by_names_and_still_loads(tmp_path):
    make_shards(tmp_path, [50, 60])
    loader = ShardedDataLoader(tmp_path, "train", B, T)
    batches(loader, 8)
    old = {k: v for k, v in loader.state_dict().items() if k not in ("shard_tokens", "fingerprints")}
    assert loader.data_change(old) is None
    resumed = ShardedDataLoader(tmp_path, "train", B, T)
    resumed.load_state_dict(old)
    assert torch.equal(resumed.next_batch()[0], loader.next_batch()[0])


def test_a_position_beyond_a_shard_that_shrank_says_the_data_changed(tmp_path):
    make_shards(tmp_path / "a", [50, 60])
    loader = ShardedDataLoader(tmp_path / "a", "train", B, T)
    batches(loader, 9)  # shard 1, position 24
    other = copy_of(tmp_path / "a", tmp_path / "other")
    write_shard(shard_path(other, "tiny", "train", 1), np.arange(20))
    with pytest.raises(DataError, match=r"does not fit .*other: tiny_train_000001\.npy in .* has 20 tokens, but 60"):
        ShardedDataLoader(other, "train", B, T).load_state_dict(loader.state_dict())


def test_write_shard_refuses_ids_beyond_uint16(tmp_path):
    with pytest.raises(DataError, match=r"\[0, 65535\]"):
        write_shard(tmp_path / "x_train_000000.npy", np.array([1, 70000]))
    assert not list(tmp_path.iterdir())


def test_write_shard_is_atomic(tmp_path, monkeypatch):
    """A write that dies midway leaves the previous shard whole and no stray files."""
    path = tmp_path / "x_train_000000.npy"
    write_shard(path, np.arange(100))
    assert np.load(path).dtype == np.uint16

    def dying_save(f, array):
        f.write(b"\x93NUMPY half a shard")
        raise KeyboardInterrupt

    monkeypatch.setattr(np, "save", dying_save)
    with pytest.raises(KeyboardInterrupt):
        write_shard(path, np.zeros(200, dtype=np.int64))
    monkeypatch.undo()
    assert np.load(path).tolist() == list(range(100))
    assert [p.name for p in tmp_path.iterdir()] == [path.name]


# -----------------------------------------------------------------------------
# The tokenizer (tiny Shakespeare, the quickstart's data: tests/test_prepare_data.py)


def test_tokenizer_failure_explains_tiktoken_cache_dir(monkeypatch):
    import tiktoken

    def no_encoding(name):
        raise ValueError(f"cannot download {name}")

    monkeypatch.setattr(tiktoken, "get_encoding", no_encoding)
    with pytest.raises(DataError, match="TIKTOKEN_CACHE_DIR"):
        get_tokenizer()
