"""The loader that streams token files (shards.py: formats, names, checks) into (B, T) batches.

ShardedDataLoader reads the files through a memory map, so no rank ever holds a whole 100M-token
shard in RAM. Token files as other trainers leave them load as they are: build-nanogpt's FineWeb-Edu
.npy shards, nanoGPT's train.bin / val.bin, llm.c's and modded-nanogpt's .bin shards.

    loader = ShardedDataLoader("data/tinyshakespeare", "train", batch_size=8, seq_len=1024,
                               rank=rank, world_size=world_size)   # shuffle=True, seed=N: a seeded order
    x, y = loader.next_batch()        # int64 (B, T); y is x shifted left by one token
    state = loader.state_dict()       # plain ints/strs/lists: fine for weights_only=True
    loader.close()                    # stops the read-ahead thread (prefetch=True; on by default with pin_memory)
    loader.data_change(state)         # None, or one line: how the shards differ from those state was read from
    data_change(state, data_root)     # the same without a loader
"""
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import environment  # noqa: F401  before torch: it sets variables torch reads when it loads
import numpy as np
import torch

from cli import log
from shards import (VOCAB_SIZE, DataError, check_token_ids, find_token_files, fingerprint, listed,
                    recorded_data_change)


def _tokens_if_they_fit(token_file, min_tokens, step_desc):
    """A checked file's token count, if one step's windows fit in it."""
    if token_file.n_tokens < min_tokens:
        raise DataError(
            f"shard {token_file.path} has {token_file.n_tokens:,} tokens but one step needs {min_tokens:,} "
            f"({step_desc}, +1 for the shifted targets); lower --micro_batch_size or --seq_len, or use more data"
        )
    return token_file.n_tokens


class ShardedDataLoader:
    """Streams (x, y) batches from a directory of shards, the same stream for every world size.

    The position is global: at each step rank r reads the r-th of world_size consecutive
    B*T windows, then the position moves past all of them. So the ranks never share a
    token, world_size=1 with N grad-accumulation calls reads what N ranks read in one step
    (within a shard), and a run resumed with another world size carries on where it stopped.
    A window that would run past the end of a shard moves to the next shard at token 0
    (the tail is dropped); past the last shard the loader wraps to the first, epoch += 1.

    prefetch reads one batch ahead on a background thread: after next_batch returns, the
    next step's window is sliced, widened to int64 and pinned while the GPU works, so the
    next call only hands it over. Anything that moves the loader (load_state_dict, reset) drops
    the read-ahead, so the batches and state_dict() are exactly those of prefetch=False.
    Default (None): on when pin_memory is, i.e. on CUDA;
    on the CPU there is no asynchronous device to hide the read behind.

    vocab_size (default GPT-2's 50257 real ids; None: no check): each shard's token ids are checked when
    the loader first opens it, and an id of vocab_size or more is a DataError naming the shard and the
    offset, instead of an IndexError mid-run (or, for the padding rows 50257..50303, an infinite loss).

    shuffle=True reads the same windows in another order (WindowOrder): each epoch the shards in an order
    drawn from (seed, epoch), and the seq_len windows of each shard in an order drawn from (seed, epoch,
    shard). A step takes the next batch_size * world_size windows of that order, rank r the r-th
    batch_size of them: again the same for every world size, and the state (epoch, seed, position in
    the order) resumes it exactly. Off by default: build-nanogpt's order, byte for byte.
    """

    def __init__(self, data_root, split, batch_size, seq_len, rank=0, world_size=1, pin_memory=False,
                 prefetch=None, vocab_size=VOCAB_SIZE, shuffle=False, seed=0):
        if batch_size < 1 or seq_len < 1:
            raise DataError(f"batch size and sequence length must be positive, got {batch_size} and {seq_len}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world size {world_size}")
        if shuffle and (not isinstance(seed, int) or seed < 0):
            raise DataError(f"the shuffle seed must be a whole number of at least 0, got {seed!r}")
        self.data_root = Path(data_root)
        self.split = split
        self.batch_size = batch_size
        self.seq_len = seq_len
        self.rank = rank
        self.world_size = world_size
        self.pin_memory = pin_memory
        if pin_memory and not torch.cuda.is_available():
            if rank == 0:
                log("dataloader: pinned memory needs CUDA, which is not available; using pageable memory")
            self.pin_memory = False
        self.prefetch = self.pin_memory if prefetch is None else bool(prefetch)
        self._executor = None  # started on the first read-ahead
        self._ahead = None  # Future of the next step's (x, y), read ahead
        self.vocab_size = vocab_size
        self._ids_checked = set()  # shard indices whose token ids were checked against vocab_size
        self.files = find_token_files(self.data_root, split)  # .npy shards, nanoGPT's .bin or llm.c's (shards.py)
        self.names = [f.name for f in self.files]
        self.shuffle, self.seed = bool(shuffle), seed
        if self.shuffle:  # a shard needs one window; the split, one step's windows
            self.shard_lengths = [_tokens_if_they_fit(f, seq_len + 1, f"one window of seq_len {seq_len}")
                                  for f in self.files]
            self.order = WindowOrder(self.shard_lengths, seq_len, seed)
            if self.order.total < self.windows_per_step:
                raise DataError(
                    f"the {split} shards in {data_root} hold {self.order.total:,} windows of seq_len {seq_len} + 1 "
                    f"tokens, but one step needs {self.windows_per_step:,} (micro batch {batch_size} x world size "
                    f"{world_size}); lower --micro_batch_size or --seq_len, or use more data")
            self._maps = {}  # shard index -> memory map, the few most recently read
        else:
            step_desc = f"micro batch {batch_size} x seq_len {seq_len} x world size {world_size}"
            self.shard_lengths = [_tokens_if_they_fit(f, self.tokens_per_step + 1, step_desc) for f in self.files]
        self.fingerprints = [fingerprint(f.path) for f in self.files]  # 12 KB read a shard: what a state records
        self.reset()

    @property
    def tokens_per_step(self):
        return self.batch_size * self.seq_len * self.world_size

    @property
    def windows_per_step(self):
        return self.batch_size * self.world_size

    def reset(self):
        self.epoch = 0
        if self.shuffle:
            self._ahead = None
            self.position = 0  # windows of this epoch's order already read
            self._next_read()  # opens (and so checks) the first step's shards now, as the in-order loader does
        else:
            self._open_shard(0)

    def _tokens_of(self, index):
        """Shard index's memory map, its ids checked against the vocabulary the first time."""
        tokens = self.files[index].tokens()
        if self.vocab_size is not None and index not in self._ids_checked:
            check_token_ids(self.files[index], tokens, self.vocab_size)  # a memmap max: one read of the shard
            self._ids_checked.add(index)
        return tokens

    def _open_shard(self, index, position=0):
        self._ahead = None  # read for where the loader was; next_batch reads the new place itself
        self.shard_index = index
        self.position = position
        self.tokens = self._tokens_of(index)

    def _skip_exhausted_shard(self):
        """Move to the next shard (or wrap) if the next step's windows do not fit in this one."""
        if self.position + self.tokens_per_step + 1 > self.shard_lengths[self.shard_index]:
            if self.shard_index + 1 == len(self.files):  # past the last shard: wrap to the first
                self.epoch += 1
            self._open_shard((self.shard_index + 1) % len(self.files))

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        ahead, self._ahead = self._ahead, None
        if ahead is not None:
            x, y = ahead.result()
        else:
            read, *where = self._next_read()
            x, y = read(*where)
        if self.shuffle:
            self.position += self.windows_per_step
            if self.position + self.windows_per_step > self.order.total:  # the rest is less than a step: dropped
                self.epoch, self.position = self.epoch + 1, 0
        else:
            self.position += self.tokens_per_step
            self._skip_exhausted_shard()
        if self.prefetch:
            # The task gets the memory maps themselves: a later shard switch cannot change what it reads.
            self._ahead = self._start_executor().submit(*self._next_read())
        return x, y

    def _next_read(self):
        """(read function, its arguments) for this rank's batch of the next step; the function touches no
        loader state, so the read-ahead thread can run it while the loop moves on."""
        if not self.shuffle:
            return self._read, self.tokens, self.position
        start = self.position + self.rank * self.batch_size
        windows = self.order.windows(self.epoch, start, self.batch_size)
        return self._read_windows, [(self._map(shard), offset) for shard, offset in windows]

    def _map(self, index):
        if index not in self._maps:
            if len(self._maps) >= 4:  # a step's windows come from one shard or two: keep a few maps open
                del self._maps[next(iter(self._maps))]
            self._maps[index] = self._tokens_of(index)
        return self._maps[index]

    def _read_windows(self, windows):
        """(x, y) from seq_len + 1 tokens at each (memory map, offset) of windows, one row each."""
        rows = torch.from_numpy(np.stack([tokens[offset : offset + self.seq_len + 1] for tokens, offset in windows])
                                .astype(np.int64))
        x, y = rows[:, :-1].contiguous(), rows[:, 1:].contiguous()  # as the in-order reads: views of nothing else
        return self._pinned(x, y)

    def _read(self, tokens, position):
        """This rank's (x, y) for the step starting at position in tokens (no loader state: see _next_read)."""
        B, T = self.batch_size, self.seq_len
        start = position + self.rank * B * T
        # astype copies the window out of the memory map; build-nanogpt reads uint16 -> int64 too
        window = torch.from_numpy(tokens[start : start + B * T + 1].astype(np.int64))
        x = window[:-1].view(B, T)
        y = window[1:].view(B, T)
        return self._pinned(x, y)

    def _pinned(self, x, y):
        return (x.pin_memory(), y.pin_memory()) if self.pin_memory else (x, y)

    def _start_executor(self):
        if self._executor is None:
            # Pin on the caller's GPU, as torch's DataLoader pin thread does (a new thread starts on GPU 0).
            gpu = (torch.cuda.current_device(),) if self.pin_memory else None
            self._executor = ThreadPoolExecutor(1, thread_name_prefix=f"dataloader-{self.split}-prefetch",
                                                initializer=torch.cuda.set_device if gpu else None, initargs=gpu or ())
        return self._executor

    def close(self):
        """Stop the read-ahead thread, after the read in flight. The loader still works, without prefetch.
        Not calling it is safe too: the thread ends with the loader or at interpreter exit."""
        self.prefetch = False
        self._ahead = None
        if self._executor is not None:
            self._executor.shutdown(wait=True, cancel_futures=True)
            self._executor = None

    def state_dict(self) -> dict:
        where = ({"shuffle": True, "seed": self.seed, "seq_len": self.seq_len,
                  "position": self.position}  # windows of this epoch's order already read
                 if self.shuffle else
                 {"shard_index": self.shard_index,
                  "position": self.position})  # token offset in the shard where the next step starts
        return {
            **where,
            "epoch": self.epoch,
            "shards": list(self.names),
            "shard_tokens": list(self.shard_lengths),  # with the fingerprints: what data_change compares
            "fingerprints": list(self.fingerprints),
            "data_root": str(self.data_root),  # only for the messages on a mismatch
        }

    def data_change(self, state):
        """None when the shards here look like those state (a checkpoint's) was read from; else one line
        saying what differs: names, token counts, or content under the same names (fingerprints)."""
        return recorded_data_change(state, self.names, self.shard_lengths, self.fingerprints, self.data_root)

    def load_state_dict(self, state: dict):
        if list(state["shards"]) != self.names:
            saved = state["shards"]
            raise DataError(f"the checkpoint's data loader state was made on other data: {len(saved)} shards "
                            f"({listed(saved)}) from {state.get('data_root', 'an unknown --data_root')}, but "
                            f"{self.data_root} has {len(self.names)} {self.split} shards ({listed(self.names)}); "
                            f"resume with --data_root {state.get('data_root', '<the data it was trained on>')}")
        if bool(state.get("shuffle", False)) != self.shuffle:
            how = "in a shuffled order" if state.get("shuffle") else "in order"
            raise DataError(f"the checkpoint read {self.data_root}'s {self.split} windows {how}; resume "
                            f"{'with' if state.get('shuffle') else 'without'} --shuffle")
        if self.shuffle:
            self._load_shuffled(state)
            return
        shard_index, position = int(state["shard_index"]), int(state["position"])
        if not (0 <= shard_index < len(self.names) and 0 <= position <= self.shard_lengths[shard_index]):
            change = self.data_change(state)
            if change:
                raise DataError(f"the checkpoint's data loader state does not fit {self.data_root}: {change}; resume "
                                f"on the data it was trained on")
            raise DataError(
                f"the checkpoint's data loader state is out of range: shard {shard_index}, position "
                f"{position}, for {len(self.names)} shards in {self.data_root}; the checkpoint is corrupt"
            )
        self.epoch = int(state["epoch"])
        self._open_shard(shard_index, position)
        # A smaller step from before (other world size, batch or seq_len) may not fit here.
        self._skip_exhausted_shard()

    def _load_shuffled(self, state):
        if int(state["seq_len"]) != self.seq_len:
            raise DataError(f"the checkpoint read shuffled windows of seq_len {state['seq_len']}, an order that "
                            f"windows of {self.seq_len} tokens cannot continue; resume with "
                            f"--seq_len {state['seq_len']}")
        position = int(state["position"])
        if not 0 <= position <= self.order.total:
            change = self.data_change(state)
            raise DataError(f"the checkpoint's data loader state does not fit {self.data_root}: "
                            + (f"{change}; resume on the data it was trained on" if change else
                               f"window {position:,} of {self.order.total:,}; the checkpoint is corrupt"))
        if int(state["seed"]) != self.seed:
            if self.rank == 0:
                log(f"dataloader: continuing the checkpoint's shuffled order (seed {state['seed']}), not seed "
                      f"{self.seed}, so that the run reads each window once an epoch")
            self.seed = int(state["seed"])
            self.order = WindowOrder(self.shard_lengths, self.seq_len, self.seed)
        self._ahead = None
        self.epoch, self.position = int(state["epoch"]), position
        if self.position + self.windows_per_step > self.order.total:  # a smaller step from before
            self.epoch, self.position = self.epoch + 1, 0


def data_change(state, data_root, split="train"):
    """loader.data_change(state) without a loader: the shards of split in data_root against a checkpoint's
    loader state; None when they look the same, else one line."""
    token_files = find_token_files(data_root, split)
    return recorded_data_change(state, [f.name for f in token_files], [f.n_tokens for f in token_files],
                                [fingerprint(f.path) for f in token_files], data_root)


class WindowOrder:
    """The shuffled order of an epoch's windows: the seq_len + 1 tokens at offset k * seq_len of a shard, for
    every k that fits, the last token of one the first of the next (the shifted targets). Each epoch the
    shards come in an order drawn from (seed, epoch), each shard's windows in an order drawn from (seed,
    epoch, shard), so a step reads from one shard or two and the page cache holds a shard at a time."""

    def __init__(self, shard_lengths, seq_len, seed):
        self.counts = [(n - 1) // seq_len for n in shard_lengths]
        self.total = sum(self.counts)
        self.seq_len, self.seed = seq_len, seed
        self._epoch = None
        self._orders = {}  # shard -> its windows' order this epoch, for the shards read lately

    def windows(self, epoch, start, count):
        """[(shard, token offset)] of the count windows from position start of epoch's order."""
        if epoch != self._epoch:
            self._epoch, self._orders = epoch, {}
            self._shards = np.random.default_rng([self.seed, epoch]).permutation(len(self.counts))
            self._ends = np.cumsum([self.counts[s] for s in self._shards])
        found = []
        for position in range(start, start + count):
            k = int(np.searchsorted(self._ends, position, side="right"))  # the k-th shard of the epoch's order
            shard = int(self._shards[k])
            if shard not in self._orders:
                if len(self._orders) >= 2:
                    del self._orders[next(iter(self._orders))]
                self._orders[shard] = np.random.default_rng([self.seed, epoch, shard]).permutation(self.counts[shard])
            local = position - (int(self._ends[k - 1]) if k else 0)
            found.append((shard, int(self._orders[shard][local]) * self.seq_len))
        return found
