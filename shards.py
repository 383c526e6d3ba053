"""GPT-2 tokens on disk: the tokenizer that makes them and the shard files that hold them.

A shard is a 1-D uint16 array saved with np.save, named <name>_<split>_<index:06d>.npy:
build-nanogpt's FineWeb-Edu shards (edufineweb_train_000001.npy) are such shards. The
preparation (dataprep) writes them; the loader (dataloader.py) reads them. No torch here, so
the preparation starts without paying for it.

    get_tokenizer()                           GPT-2's BPE (tiktoken r50k_base), offline from TIKTOKEN_CACHE_DIR
    EOT_TOKEN                                 50256, <|endoftext|>: it opens every document
    shard_path(out_dir, name, split, index)   where shard `index` of a split goes
    write_shard(path, tokens)                 save tokens as a uint16 shard, atomically
    shard_files(data_root, split)             the shards of a split there, in order ([] if none)
    find_shards(data_root, split)             the same, or a DataError naming the command that makes them
    shard_length(path)                        its token count, after checking header, dtype, shape and size
    check_token_ids(path, tokens, vocab_size) a DataError naming the first id >= vocab_size and its offset
    fingerprint(path)                         a cheap content hash: size and 3 x 4 KB (start, middle, end)
    recorded_data_change(recorded, names, tokens, fingerprints, data_root)
                                              how shards differ from those a loader state recorded, or None
    DataError                                 a data mistake the user can fix (a cli.UserError)
"""
import hashlib
import os
import re
from pathlib import Path

import numpy as np

import files
from cli import UserError

EOT_TOKEN = 50256  # GPT-2 <|endoftext|>; it opens every document
VOCAB_SIZE = 50257  # GPT-2's real token ids, 0..50256; the model pads its embedding to 50304 rows
PADDED_VOCAB_SIZE = 50304  # ids from VOCAB_SIZE up to here hit the padding rows: no error, an infinite loss
FINGERPRINT_BYTES = 4096  # read at each of a file's start, middle and end
SCAN_TOKENS = 1 << 24  # tokens compared at a time when looking for the first bad id (32 MB of uint16)

PREPARE_HINT = "python -m scripts.prepare_data --source tinyshakespeare --out_dir {}"


class DataError(UserError):
    """A user mistake with the data: the message says what is wrong, where, and the fix."""


def get_tokenizer():
    """GPT-2's BPE. r50k_base has the same ranks, regex and <|endoftext|> as "gpt2" and
    needs only one file, so it works offline from TIKTOKEN_CACHE_DIR."""
    import tiktoken

    try:
        return tiktoken.get_encoding("r50k_base")
    except Exception as r50k_error:
        try:
            enc = tiktoken.get_encoding("gpt2")
        except Exception as gpt2_error:
            raise DataError(
                f"cannot load the GPT-2 tokenizer: r50k_base failed ({r50k_error}); gpt2 failed "
                f"({gpt2_error}). tiktoken downloads its BPE files on first use; offline, set "
                f"TIKTOKEN_CACHE_DIR to a directory holding a tiktoken cache "
                f"(TIKTOKEN_CACHE_DIR={os.environ.get('TIKTOKEN_CACHE_DIR', '<unset>')})"
            ) from None
        print(f"tokenizer: r50k_base unavailable ({r50k_error}); using tiktoken's gpt2 (same tokens)")
        return enc


def shard_path(out_dir, name, split, index) -> Path:
    return Path(out_dir) / f"{name}_{split}_{index:06d}.npy"


def write_shard(path, tokens):
    """Save tokens as a uint16 .npy, atomically: a killed writer leaves no half-written shard."""
    path = Path(path)
    tokens = np.asarray(tokens)
    if tokens.ndim != 1:
        raise DataError(f"cannot write {path}: tokens must be 1-D, got shape {tokens.shape}")
    if tokens.dtype != np.uint16:
        if not np.issubdtype(tokens.dtype, np.integer):
            raise DataError(f"cannot write {path}: token ids must be integers, got dtype {tokens.dtype}")
        if tokens.size and (tokens.min() < 0 or tokens.max() >= 2**16):
            raise DataError(
                f"cannot write {path}: token ids must lie in [0, 65535] to fit uint16, got "
                f"[{tokens.min()}, {tokens.max()}]; GPT-2 ids are below 50257, so check the tokenizer"
            )
        tokens = tokens.astype(np.uint16)  # uint16 is enough: GPT-2 has 50257 tokens
    path.parent.mkdir(parents=True, exist_ok=True)
    files.atomic_write(path, lambda f: np.save(f, tokens), expected_bytes=tokens.nbytes + 128,
                       full_hint="Free some space, or write the shards to another folder (--out_dir)")


def shard_files(data_root, split) -> list[Path]:
    """The <name>_<split>_<index>.npy files in data_root, in order; [] when there are none."""
    # The glob alone would let a dataset named 'x_val' leak its train shards into 'val'.
    index_suffix = re.compile(rf"_{re.escape(split)}_\d+\.npy$")
    return sorted(p for p in Path(data_root).glob(f"*_{split}_*.npy") if index_suffix.search(p.name))


def find_shards(data_root, split) -> list[Path]:
    """shard_files, or a DataError naming the command that makes them."""
    data_root = Path(data_root)
    pattern = f"*_{split}_*.npy"
    if not data_root.is_dir():
        raise DataError(
            f"data directory {data_root} does not exist; create shards there, e.g. run: "
            f"{PREPARE_HINT.format(data_root)}"
        )
    shards = shard_files(data_root, split)
    if not shards:
        raise DataError(
            f"no shards matching '{pattern}' in {data_root}; run: {PREPARE_HINT.format(data_root)} "
            f"(or --source text / fineweb-edu; a val split needs --val_fraction > 0)"
        )
    return shards


def remake_hint(path):
    return (f"copy it again, or re-create {path.parent} with the python -m scripts.prepare_data command that made "
            f"it (e.g. {PREPARE_HINT.format(path.parent)} --overwrite)")


def shard_length(path) -> int:
    """Check a shard before training reads it: a .npy header, dtype uint16, 1-D, not empty, and a file
    exactly as long as the header says (a copy cut short would otherwise fail mid-run, or not at all)."""
    path = Path(path)
    remake = remake_hint(path)
    try:
        with open(path, "rb") as f:
            version = np.lib.format.read_magic(f)
            read_header = {(1, 0): np.lib.format.read_array_header_1_0,
                           (2, 0): np.lib.format.read_array_header_2_0}.get(version)
            if read_header is None:
                raise ValueError(f"unsupported .npy format version {version}")
            shape, fortran_order, dtype = read_header(f)
            data_offset = f.tell()
        size = path.stat().st_size
    except (OSError, ValueError, EOFError) as e:
        raise DataError(f"shard {path} is not a readable .npy file ({e}); {remake}") from None
    if dtype != np.uint16:
        raise DataError(
            f"shard {path} has dtype {dtype}, expected uint16 (GPT-2 token ids fit in 16 bits); "
            f"convert it with np.save(path, np.load(path).astype(np.uint16)) or {remake}"
        )
    if len(shape) != 1:
        raise DataError(f"shard {path} has shape {shape}, expected a 1-D array of tokens; {remake}")
    expected = data_offset + shape[0] * dtype.itemsize
    if size != expected:
        what = "cut short" if size < expected else "longer than its header says"
        raise DataError(f"shard {path} is {what}: its header says {shape[0]:,} tokens ({expected:,} bytes) but the file "
                        f"has {size:,} bytes (an interrupted copy or write?); {remake}")
    if shape[0] == 0:
        raise DataError(f"shard {path} is empty (0 tokens); delete it or {remake}")
    return shape[0]


def check_token_ids(path, tokens, vocab_size):
    """A DataError if any of tokens (a shard's memory map) is vocab_size or more, naming the first such id
    and its offset: ids the model has no row for crash the embedding lookup mid-run, and ids of its padding
    rows (VOCAB_SIZE..PADDED_VOCAB_SIZE-1) give an infinite loss. One pass over the map when all is well."""
    if not len(tokens) or int(tokens.max()) < vocab_size:
        return
    for start in range(0, len(tokens), SCAN_TOKENS):
        bad = np.flatnonzero(tokens[start : start + SCAN_TOKENS] >= vocab_size)
        if len(bad):
            offset = start + int(bad[0])
            break
    token = int(tokens[offset])
    what = ("one of the model's padding rows, which would make the loss infinite"
            if vocab_size == VOCAB_SIZE and token < PADDED_VOCAB_SIZE else "beyond the model's embedding")
    raise DataError(f"shard {path} holds token id {token:,} at token {offset:,} (the first of those; the largest is "
                    f"{int(tokens.max()):,}), but the vocabulary has {vocab_size:,} ids (0 to {vocab_size - 1:,}): "
                    f"{what}. It was not tokenized with GPT-2's BPE, or is damaged; {remake_hint(Path(path))}")


def fingerprint(path) -> str:
    """A cheap identity of a file's content: a hash of its size and of FINGERPRINT_BYTES at its start,
    middle and end, 12 KB read whatever its size. Other text under the same name and size shows in it,
    unless the two differ only between those places."""
    size = os.path.getsize(path)
    digest = hashlib.blake2b(str(size).encode(), digest_size=8)
    with open(path, "rb") as f:
        for start in (0, max(0, (size - FINGERPRINT_BYTES) // 2), max(0, size - FINGERPRINT_BYTES)):
            f.seek(start)
            digest.update(f.read(FINGERPRINT_BYTES))
    return digest.hexdigest()


def listed(names, limit=2):
    return ", ".join(names[:limit]) + (", ..." if len(names) > limit else "")


def recorded_data_change(recorded, names, tokens, fingerprints, data_root):
    """One line saying how the shards now in data_root (names, token counts, fingerprints, in order) differ
    from those a loader's state_dict recorded, or None when they look the same. States saved before the
    counts and fingerprints were recorded are compared by their names only."""
    then = recorded.get("data_root", "the data it was trained on")
    old_names = list(recorded["shards"])
    if old_names != list(names):
        return (f"the checkpoint read {len(old_names)} shards ({listed(old_names)}) from {then}, but {data_root} has "
                f"{len(names)} ({listed(list(names))})")
    for name, old, new in zip(names, recorded.get("shard_tokens") or [], tokens):
        if old != new:
            return f"{name} in {data_root} has {new:,} tokens, but {old:,} when the checkpoint was written (in {then})"
    changed = [name for name, old, new in zip(names, recorded.get("fingerprints") or [], fingerprints) if old != new]
    if changed:
        more = f" (and {len(changed) - 1} more)" if len(changed) > 1 else ""
        return (f"{changed[0]}{more} in {data_root} holds other tokens than when the checkpoint was written (in "
                f"{then}): same name and size, another fingerprint")
    return None
