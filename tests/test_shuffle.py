"""shuffle=True: a seeded order of windows per epoch (and of shards), each window once an epoch, the same
for any world size, and exactly resumable; off by default."""
import numpy as np
import pytest
import torch

from dataloader import ShardedDataLoader
from shards import DataError, shard_path, write_shard

B, T = 2, 4


def make_shards(folder, lengths):
    """Shards whose tokens count up across shards: a window is known by its first token."""
    start = 0
    for index, length in enumerate(lengths):
        write_shard(shard_path(folder, "tiny", "train", index), np.arange(start, start + length))
        start += length


def window_starts(x):
    return [int(row[0]) for row in x]


def read_epoch(loader, steps):
    starts = []
    for _ in range(steps):
        x, y = loader.next_batch()
        assert torch.equal(x[:, 1:], y[:, :-1]) and torch.equal(y[:, -1], x[:, -1] + 1)  # the tokens that follow
        starts += window_starts(x)
    return starts


def test_every_window_of_an_epoch_is_read_once_in_an_order_that_changes_each_epoch(tmp_path):
    make_shards(tmp_path, [49, 33, 41])  # 12 + 8 + 10 windows of 4 (+1) tokens: 15 steps of 2
    windows = sorted([4 * k for k in range(12)] + [49 + 4 * k for k in range(8)] + [82 + 4 * k for k in range(10)])
    loader = ShardedDataLoader(tmp_path, "train", B, T, shuffle=True, seed=1)
    epochs = []
    for epoch in range(3):
        assert loader.epoch == epoch
        epochs.append(read_epoch(loader, 15))
        assert sorted(epochs[-1]) == windows
    assert loader.epoch == 3
    assert len({tuple(e) for e in epochs}) == 3 and windows not in epochs  # shuffled, and anew each epoch
    # One shard at a time: the 12 windows of shard 0 come together, wherever the shard falls in the order.
    shard0 = [i for i, start in enumerate(epochs[0]) if start < 49]
    assert shard0 == list(range(shard0[0], shard0[0] + 12))

    again = ShardedDataLoader(tmp_path, "train", B, T, shuffle=True, seed=1)
    other = ShardedDataLoader(tmp_path, "train", B, T, shuffle=True, seed=2)
    assert read_epoch(again, 15) == epochs[0] and read_epoch(other, 15) != epochs[0]


def test_the_tail_of_an_epoch_smaller_than_a_step_is_dropped(tmp_path):
    make_shards(tmp_path, [49, 33, 45])  # 12 + 8 + 11 = 31 windows: 15 steps of 2, one window left over
    loader = ShardedDataLoader(tmp_path, "train", B, T, shuffle=True, seed=0)
    first = read_epoch(loader, 15)
    assert len(set(first)) == 30 and loader.epoch == 1 and loader.state_dict()["position"] == 0


@pytest.mark.parametrize("prefetch", [False, True])
def test_world_sizes_1_and_2_see_the_same_tokens_in_the_same_steps(tmp_path, prefetch):
    make_shards(tmp_path, [49, 41, 41])  # 12 + 10 + 10 = 32 windows: 8 steps of 2 ranks x 2
    ranks = [ShardedDataLoader(tmp_path, "train", B, T, rank=r, world_size=2, shuffle=True, seed=5, prefetch=prefetch)
             for r in range(2)]
    single = ShardedDataLoader(tmp_path, "train", B, T, shuffle=True, seed=5, prefetch=prefetch)
    for step in range(20):  # two epochs and a half
        (x0, y0), (x1, y1) = ranks[0].next_batch(), ranks[1].next_batch()
        (xa, ya), (xb, yb) = single.next_batch(), single.next_batch()  # 2 gradient-accumulation calls
        assert torch.equal(x0, xa) and torch.equal(y0, ya) and torch.equal(x1, xb) and torch.equal(y1, yb), step
        assert not set(window_starts(x0)) & set(window_starts(x1))
        assert ranks[0].state_dict() == ranks[1].state_dict() == single.state_dict()
    for loader in ranks + [single]:
        loader.close()


@pytest.mark.parametrize("prefetch", [False, True])
def test_a_loader_restored_from_its_state_continues_exactly(tmp_path, prefetch):
    make_shards(tmp_path / "data", [49, 33, 41])
    loader = ShardedDataLoader(tmp_path / "data", "train", B, T, shuffle=True, seed=3, prefetch=prefetch)
    read_epoch(loader, 11)  # mid epoch 0, a batch read ahead with prefetch
    torch.save({"loader": loader.state_dict()}, tmp_path / "ckpt.pt")
    state = torch.load(tmp_path / "ckpt.pt", weights_only=True)["loader"]
    assert (state["shuffle"], state["seed"], state["epoch"], state["position"], state["seq_len"]) == (True, 3, 0, 22, T)

    resumed = ShardedDataLoader(tmp_path / "data", "train", B, T, shuffle=True, seed=3, prefetch=prefetch)
    resumed.load_state_dict(state)
    for step in range(25):  # over the end of epoch 0 and into epoch 2
        (x, y), (rx, ry) = loader.next_batch(), resumed.next_batch()
        assert torch.equal(x, rx) and torch.equal(y, ry), step
        assert loader.state_dict() == resumed.state_dict()
    assert resumed.epoch == 2
    loader.close()
    resumed.close()


def test_a_resume_with_another_world_size_continues_the_same_order(tmp_path):
    make_shards(tmp_path, [49, 41, 41])  # 32 windows
    ranks = [ShardedDataLoader(tmp_path, "train", B, T, rank=r, world_size=2, shuffle=True, seed=9) for r in range(2)]
    reference = ShardedDataLoader(tmp_path, "train", B, T, shuffle=True, seed=9)
    read = []
    for _ in range(3):
        for loader in ranks:
            read += window_starts(loader.next_batch()[0])
    single = ShardedDataLoader(tmp_path, "train", B, T, shuffle=True, seed=9)
    single.load_state_dict(ranks[0].state_dict())
    read += read_epoch(single, 10)
    assert read == read_epoch(reference, 16)


def test_a_resume_that_changes_the_order_is_refused_or_named(tmp_path, capsys):
    make_shards(tmp_path, [49, 33, 41])
    in_order = ShardedDataLoader(tmp_path, "train", B, T).state_dict()
    shuffled_loader = ShardedDataLoader(tmp_path, "train", B, T, shuffle=True, seed=4)
    read_epoch(shuffled_loader, 3)
    shuffled = shuffled_loader.state_dict()
    with pytest.raises(DataError, match=r"read .*'s train windows in order; resume without --shuffle"):
        ShardedDataLoader(tmp_path, "train", B, T, shuffle=True).load_state_dict(in_order)
    with pytest.raises(DataError, match=r"windows in a shuffled order; resume with --shuffle"):
        ShardedDataLoader(tmp_path, "train", B, T).load_state_dict(shuffled)
    with pytest.raises(DataError, match=r"shuffled windows of seq_len 4, .* resume with --seq_len 4"):
        ShardedDataLoader(tmp_path, "train", B, 8, shuffle=True).load_state_dict(shuffled)

    other_seed = ShardedDataLoader(tmp_path, "train", B, T, shuffle=True, seed=99)
    capsys.readouterr()
    other_seed.load_state_dict(shuffled)  # the checkpoint's order goes on, and one line says so
    assert "continuing the checkpoint's shuffled order (seed 4), not seed 99" in capsys.readouterr().out
    assert read_epoch(other_seed, 5) == read_epoch(shuffled_loader, 5)


def test_shuffled_reads_check_the_vocabulary_too(tmp_path):
    make_shards(tmp_path, [49, 33])
    bad = np.arange(49, 82)
    bad[5] = 50280
    write_shard(shard_path(tmp_path, "tiny", "train", 1), bad)
    with pytest.raises(DataError, match=r"tiny_train_000001\.npy holds token id 50,280 at token 5"):
        loader = ShardedDataLoader(tmp_path, "train", B, T, shuffle=True, seed=0)
        read_epoch(loader, 10)  # shard 1 is opened at the start or within the epoch, never skipped


def test_too_little_data_for_one_shuffled_step_says_so(tmp_path):
    make_shards(tmp_path, [9])  # 2 windows of 4 (+1)
    with pytest.raises(DataError, match=r"hold 2 windows of seq_len 4 \+ 1 tokens, but one step needs 4"):
        ShardedDataLoader(tmp_path, "train", B, T, world_size=2, shuffle=True)
