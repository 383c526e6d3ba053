"""GPT-2 tokens for a stream of texts, from worker processes, in the stream's order.

    for tokens, lengths in tokenize(items, num_proc):   # items: (text, starts_document) pairs
        ...  # tokens: uint16, the items' tokens back to back, <|endoftext|> (50256) in front of
             # each item that starts a document; lengths: int64, each item's token count

Items travel to the workers in batches of about BATCH_CHARS characters, one task per batch:
per-document tasks would spend more on pickling and queueing short documents than on tokenizing
them. At most IN_FLIGHT_PER_PROCESS batches per process are queued ahead, so a stream is read
about as fast as it is tokenized instead of into memory (Pool.imap reads its whole input ahead).
"""
import collections
import signal
from multiprocessing import Pool

import numpy as np

from shards import EOT_TOKEN, DataError, get_tokenizer

# Characters per task: enough that pickling and queueing it cost little next to tokenizing it,
# few enough that no worker sits idle long at the start and the end of a run waiting for the last
# big task (docs/DATA.md, Throughput).
BATCH_CHARS = 1 << 18
IN_FLIGHT_PER_PROCESS = 2  # one batch being tokenized, one waiting: the worker never idles

_tokenizer = None


def load_tokenizer():
    """Load GPT-2's BPE in this process (once): a DataError now, before any file is written, if it cannot."""
    global _tokenizer
    if _tokenizer is None:
        tokenizer = get_tokenizer()
        if not hasattr(tokenizer, "encode_to_numpy"):
            import tiktoken

            raise DataError(f"tiktoken {getattr(tiktoken, '__version__', '< 0.8')} has no encode_to_numpy, which "
                            f"the data preparation uses; upgrade it: pip install 'tiktoken>=0.9'")
        _tokenizer = tokenizer


def _init_worker():
    load_tokenizer()  # a forked worker has the parent's already; a spawned one loads its own
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the main process's to handle; it stops the pool


def encode(text):
    """tiktoken's encode_ordinary(text) as a numpy array (uint32).

    encode_to_numpy with no special tokens allowed or refused is encode_ordinary without a Python
    int per token and their conversion to numpy (tested equal; docs/DATA.md measures the difference).
    A lone surrogate (JSON can hold "\\ud800") makes it raise; encode_ordinary replaces it, so such
    text takes that path."""
    try:
        return _tokenizer.encode_to_numpy(text, allowed_special=set(), disallowed_special=())
    except UnicodeEncodeError:
        return np.array(_tokenizer.encode_ordinary(text), dtype=np.uint32)


EOT = np.array([EOT_TOKEN], dtype=np.uint32)


def encode_batch(batch):
    """[(text, starts_document)] -> (uint16 tokens of all items back to back, int64 length of each).
    A text that is not a str is parsed here, by its .text() (sources.JsonLine)."""
    parts = []
    lengths = np.empty(len(batch), dtype=np.int64)
    for i, (text, starts_document) in enumerate(batch):
        tokens = encode(text if isinstance(text, str) else text.text())
        if starts_document:
            parts.append(EOT)
        parts.append(tokens)
        lengths[i] = len(tokens) + starts_document
    # uint16 is enough: GPT-2 has 50257 tokens
    return np.concatenate(parts, dtype=np.uint16, casting="unsafe"), lengths


def batches(items, max_chars):
    """Group items into lists of about max_chars characters (at least one item each)."""
    batch, chars = [], 0
    for item in items:
        batch.append(item)
        chars += len(item[0])
        if chars >= max_chars:
            yield batch
            batch, chars = [], 0
    if batch:
        yield batch


def tokenize(items, num_proc):
    """Yield (tokens, lengths) per batch of items, in order, from num_proc processes (1: this one)."""
    item_batches = batches(items, BATCH_CHARS)
    load_tokenizer()  # once, here: forked workers inherit the loaded BPE ranks instead of each loading them
    if num_proc == 1:
        yield from map(encode_batch, item_batches)
        return
    with Pool(num_proc, initializer=_init_worker) as pool:  # leaving the block (done, error, close) ends the workers
        queued = collections.deque()
        for batch in item_batches:
            queued.append(pool.apply_async(encode_batch, (batch,)))
            if len(queued) >= IN_FLIGHT_PER_PROCESS * num_proc:
                yield queued.popleft().get()
        while queued:
            yield queued.popleft().get()
