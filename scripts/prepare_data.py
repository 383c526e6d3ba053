#!/usr/bin/env python3
"""Tokenize a corpus with GPT-2's BPE into uint16 shards that dataloader.py streams.

    python scripts/prepare_data.py --source tinyshakespeare                 # -> data/tinyshakespeare
    python scripts/prepare_data.py --source text --input 'books/*.txt' --name mybooks
    python scripts/prepare_data.py --source fineweb-edu                     # -> data/edu_fineweb10B

Every document starts with <|endoftext|> (50256), as in build-nanogpt. FineWeb-Edu gets
build-nanogpt's layout: shard 0 is val, the rest train (edufineweb_train_000001.npy, ...).
"""
import argparse
import glob
import os
import re
import sys
from multiprocessing import Pool
from pathlib import Path

import numpy as np
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from dataloader import (  # noqa: E402
    EOT_TOKEN, DataError, ensure_tinyshakespeare, get_tokenizer, shard_path, write_shard,
)

TEXT_CHUNK_CHARS = 1 << 20  # files above ~1M characters are cut into pieces the workers share
# Cut just before a blank line that follows a non-space character: GPT-2's regex never joins
# that character with the newlines, so the pieces tokenize exactly like the whole file.
PARAGRAPH_CUT = re.compile(r"(?<=\S)(?=\n\n)")


# -----------------------------------------------------------------------------
# Tokenization (runs in the worker processes)

_tokenizer = None


def _init_worker():
    global _tokenizer
    _tokenizer = get_tokenizer()


def tokenize(piece):
    """(text, starts_document) -> uint16 tokens, with EOT in front of each document."""
    text, starts_document = piece
    tokens = _tokenizer.encode_ordinary(text)
    return np.array([EOT_TOKEN] + tokens if starts_document else tokens, dtype=np.uint16)


def tokenize_all(pieces, num_proc, chunksize):
    """Yield the token arrays of pieces in order, from num_proc worker processes."""
    if num_proc == 1:
        _init_worker()
        yield from map(tokenize, pieces)
        return
    with Pool(num_proc, initializer=_init_worker) as pool:
        yield from pool.imap(tokenize, pieces, chunksize=chunksize)


def split_paragraphs(text, max_chars=None):
    """Cut text into pieces of about max_chars (default TEXT_CHUNK_CHARS) at blank lines."""
    max_chars = max_chars or TEXT_CHUNK_CHARS
    start = 0
    while len(text) - start > max_chars:
        cut = PARAGRAPH_CUT.search(text, start + max_chars)
        if cut is None:
            break
        yield text[start : cut.start()]
        start = cut.start()
    yield text[start:]


# -----------------------------------------------------------------------------
# Shards


def pack_into_shards(token_arrays, out_dir, name, shard_size, split_of_shard, max_shards=None):
    """Pack a stream of token arrays into shards of shard_size tokens (the last may be shorter).
    split_of_shard(i) names the split of the i-th shard, which is saved with index i.
    Returns [(path, split, n_tokens)] of the shards written."""
    written = []
    buffer = np.empty(shard_size, dtype=np.uint16)
    filled = 0
    progress = None

    def flush():
        index = len(written)
        path = shard_path(out_dir, name, split_of_shard(index), index)
        write_shard(path, buffer[:filled])
        written.append((path, split_of_shard(index), filled))

    for tokens in token_arrays:
        while len(tokens):
            if progress is None:
                desc = f"{split_of_shard(len(written))} shard {len(written)}"
                progress = tqdm(total=shard_size, unit="tokens", unit_scale=True, desc=desc)
            take = min(shard_size - filled, len(tokens))
            buffer[filled : filled + take] = tokens[:take]
            filled += take
            tokens = tokens[take:]
            progress.update(take)
            if filled == shard_size:
                flush()
                filled = 0
                progress.close()
                progress = None
                if max_shards is not None and len(written) >= max_shards:
                    return written
    if progress is not None:
        progress.close()
    if filled:
        flush()
    return written


def existing_shards(out_dir):
    return sorted(p for split in ("train", "val") for p in Path(out_dir).glob(f"*_{split}_*.npy"))


def check_out_dir(out_dir, overwrite):
    """Refuse to mix new shards with old ones unless --overwrite."""
    old = existing_shards(out_dir)
    if old and not overwrite:
        raise DataError(
            f"{out_dir} already holds {len(old)} shards ({old[0].name}, ...); pass --overwrite to "
            f"replace them, or choose another --out_dir"
        )


def remove_old_shards(out_dir):
    """--overwrite: called once the source has been checked, just before the new shards are written."""
    for path in existing_shards(out_dir):
        path.unlink()


# -----------------------------------------------------------------------------
# Sources


def prepare_text(args):
    paths = sorted({Path(p) for pattern in args.input for p in glob.glob(pattern, recursive=True)})
    paths = [p for p in paths if p.is_file()]
    if not paths:
        patterns = " ".join(repr(p) for p in args.input)
        raise DataError(f"no files match --input {patterns}; check the paths, and quote globs so the shell keeps them")

    def pieces():
        for path in paths:
            try:
                text = path.read_text(encoding="utf-8")
            except UnicodeDecodeError as e:
                raise DataError(
                    f"{path} is not UTF-8 text ({e}); convert it (iconv -t UTF-8) or leave it out of --input"
                ) from None
            for i, piece in enumerate(split_paragraphs(text)):
                yield piece, i == 0

    token_arrays = tokenize_all(pieces(), args.num_proc, chunksize=1)
    total_bytes = sum(p.stat().st_size for p in paths)
    print(f"tokenizing {len(paths)} file{'' if len(paths) == 1 else 's'} ({total_bytes:,} bytes) "
          f"with {args.num_proc} processes")
    # The val split is the last val_fraction of all tokens, so all of them come first.
    tokens = np.concatenate(list(tqdm(token_arrays, unit="pieces", desc="tokenize")))
    n_train = int(len(tokens) * (1 - args.val_fraction))
    remove_old_shards(args.out_dir)
    written = pack_into_shards([tokens[:n_train]], args.out_dir, args.name, args.shard_size, lambda i: "train")
    written += pack_into_shards([tokens[n_train:]], args.out_dir, args.name, args.shard_size, lambda i: "val")
    return written


def prepare_fineweb_edu(args):
    try:
        import datasets  # optional: only this source needs it
    except ImportError:
        raise DataError("--source fineweb-edu needs the Hugging Face datasets package: pip install datasets") from None
    fineweb = datasets.load_dataset("HuggingFaceFW/fineweb-edu", name="sample-10BT", split="train",
                                    streaming=True)
    pieces = ((doc["text"], True) for doc in fineweb)
    token_arrays = tokenize_all(pieces, args.num_proc, chunksize=16)
    remove_old_shards(args.out_dir)
    try:
        return pack_into_shards(token_arrays, args.out_dir, "edufineweb", args.shard_size,
                                lambda i: "val" if i == 0 else "train", max_shards=args.max_shards)
    finally:
        token_arrays.close()  # --max_shards may stop early: shut the worker pool down now


def prepare_tinyshakespeare(args):
    # 1 MB of text, one document, one shard per split: one process tokenizes it in a second.
    remove_old_shards(args.out_dir)
    ensure_tinyshakespeare(args.out_dir, val_fraction=args.val_fraction)
    return [(p, split, len(np.load(p, mmap_mode="r"))) for split in ("train", "val")
            for p in sorted(Path(args.out_dir).glob(f"tinyshakespeare_{split}_*.npy"))]


DEFAULT_OUT_DIRS = {"tinyshakespeare": "data/tinyshakespeare", "fineweb-edu": "data/edu_fineweb10B"}


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", required=True, choices=["tinyshakespeare", "text", "fineweb-edu"],
                        help="corpus to tokenize (required)")
    parser.add_argument("--input", nargs="+", default=[], metavar="GLOB",
                        help="--source text: files or quoted globs ('books/**/*.txt'); each file is one "
                             "document, and files above ~1M characters are cut at blank lines ('\\n\\n') "
                             "so the workers can share them. All tokens are held in memory (2 bytes each) "
                             "to cut off the val split (default: none)")
    parser.add_argument("--name", help="--source text: dataset name, the shards' prefix (<name>_train_000000.npy); required")
    parser.add_argument("--out_dir", help="directory for the shards (default: data/tinyshakespeare, data/<name>, "
                                          "or data/edu_fineweb10B by source)")
    parser.add_argument("--val_fraction", type=float, default=0.1,
                        help="tinyshakespeare and text: the last fraction of tokens goes to val (default: 0.1); "
                             "fineweb-edu: unused, its first shard is val")
    parser.add_argument("--shard_size", type=int, default=100_000_000,
                        help="text and fineweb-edu: tokens per shard (default: 100000000, 200 MB as uint16)")
    parser.add_argument("--max_shards", type=int, default=None,
                        help="fineweb-edu: stop after this many shards, val included (default: all, ~100)")
    parser.add_argument("--num_proc", type=int, default=max(1, (os.cpu_count() or 1) // 2),
                        help="text and fineweb-edu: tokenizer processes (default: half the CPU cores, "
                             "here %(default)s)")
    parser.add_argument("--overwrite", action="store_true",
                        help="delete the shards already in --out_dir first (default: refuse to touch them)")
    args = parser.parse_args(argv)
    if args.source == "text" and not (args.input and args.name):
        parser.error("--source text needs --input GLOB [GLOB ...] and --name NAME")
    if args.source != "text" and (args.input or args.name):
        parser.error(f"--input and --name are for --source text, not --source {args.source}")
    if args.name is not None and (not args.name or "/" in args.name or os.sep in args.name):
        parser.error(f"--name {args.name!r} must be a plain file name prefix, e.g. mybooks")
    if not 0 <= args.val_fraction < 1:
        parser.error(f"--val_fraction must be in [0, 1), got {args.val_fraction}")
    if args.shard_size < 1 or args.num_proc < 1 or (args.max_shards is not None and args.max_shards < 1):
        parser.error("--shard_size, --num_proc and --max_shards must be positive")
    if args.out_dir is None:
        args.out_dir = f"data/{args.name}" if args.source == "text" else DEFAULT_OUT_DIRS[args.source]
    return args


def main(argv=None):
    args = parse_args(argv)
    prepare = {"tinyshakespeare": prepare_tinyshakespeare, "text": prepare_text,
               "fineweb-edu": prepare_fineweb_edu}[args.source]
    try:
        check_out_dir(args.out_dir, args.overwrite)
        written = prepare(args)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {len(written)} shards to {args.out_dir}:")
    for split in ("train", "val"):
        sizes = [n for _, s, n in written if s == split]
        print(f"  {split:5s} {len(sizes)} shard{'' if len(sizes) == 1 else 's'}, {sum(sizes):,} tokens")
    return 0


if __name__ == "__main__":
    sys.exit(main())
