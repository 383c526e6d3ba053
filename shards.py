"""GPT-2 tokens on disk: the tokenizer that makes them and the token files that hold them.

The loader (dataloader.py) reads three formats of uint16 tokens, one per split in a folder:

    <name>_<split>_<index:06d>.npy   np.save of a 1-D uint16 array: this project's shards, which the
                                     preparation (dataprep) writes, and build-nanogpt's FineWeb-Edu shards
    <split>.bin                      nanoGPT's train.bin / val.bin: raw uint16, no header
    <name>_<split>[_<index>].bin     llm.c's and modded-nanogpt's shards (fineweb_train_000001.bin): 256 int32
                                     (magic 20240520, version 1, token count), then the uint16 tokens

No torch here, so the preparation starts without paying for it.

    get_tokenizer()                           GPT-2's BPE (tiktoken r50k_base), offline from TIKTOKEN_CACHE_DIR
    EOT_TOKEN, VOCAB_SIZE                     50256, <|endoftext|>, which opens every document; 50257 ids
    shard_path(out_dir, name, split, index)   where .npy shard `index` of a split goes
    write_shard(path, tokens)                 save tokens as a uint16 .npy shard, atomically
    shard_files(data_root, split)             the .npy shards of a split there, in order ([] if none)
    find_token_files(data_root, split)        [TokenFile] of any format, checked, or a DataError naming the fix
    TokenFile.tokens()                        its tokens as a read-only memory map
    check_token_ids(token_file, tokens, vocab_size)   a DataError naming the first id >= vocab_size, and where
    fingerprint(path)                         a cheap content hash: size and 3 x 4 KB (start, middle, end)
    recorded_data_change(recorded, names, tokens, fingerprints, data_root)
                                              how files differ from those a loader state recorded, or None
    DataError                                 a data mistake the user can fix (a cli.UserError)
"""
import hashlib
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

import files
from cli import UserError, log

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
        log(f"tokenizer: r50k_base unavailable ({r50k_error}); using tiktoken's gpt2 (same tokens)")
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


@dataclass(frozen=True)
class TokenFile:
    """A checked file of uint16 tokens: the tokens are n_tokens uint16 values from byte `offset` on."""

    path: Path
    format: str  # a FORMATS key
    offset: int
    n_tokens: int

    @property
    def name(self):
        return self.path.name

    def tokens(self):
        """The tokens as a read-only memory map: no rank ever holds a whole shard in RAM."""
        return np.memmap(self.path, dtype=np.uint16, mode="r", offset=self.offset, shape=(self.n_tokens,))

    def remake_hint(self):
        return FORMATS[self.format]["remake"].format(path=self.path, folder=self.path.parent,
                                                     prepare=PREPARE_HINT.format(self.path.parent))


# The token files the loader reads, as other trainers leave them; a folder holds one format per split.
FORMATS = {
    "npy": {"what": "*_{split}_*.npy shards (this project's and build-nanogpt's)",
            "remake": "copy it again, or re-create {folder} with the python -m scripts.prepare_data command that "
                      "made it (e.g. {prepare} --overwrite)"},
    "nanogpt": {"what": "nanoGPT's {split}.bin",
                "remake": "copy it again, or make it again with the nanoGPT prepare.py that wrote it"},
    "llm.c": {"what": "llm.c's *_{split}_*.bin shards",
              "remake": "copy it again, or make it again with the llm.c (or modded-nanogpt) data script that wrote it"},
}
LLMC_HEADER_INTS = 256  # llm.c's token files: 256 int32, then the uint16 tokens
LLMC_MAGIC, LLMC_VERSION = 20240520, 1  # header[0], header[1]; header[2] is the token count


def find_token_files(data_root, split) -> list[TokenFile]:
    """The checked token files of split in data_root, in order (see FORMATS), or a DataError naming the
    command that makes them."""
    data_root = Path(data_root)
    if not data_root.is_dir():
        raise DataError(
            f"data directory {data_root} does not exist; create shards there, e.g. run: "
            f"{PREPARE_HINT.format(data_root)}"
        )
    llmc_name = re.compile(rf"_{re.escape(split)}(_\d+)?\.bin$")  # fineweb_val_000000.bin, tiny_shakespeare_val.bin
    nanogpt = data_root / f"{split}.bin"
    by_format = {"npy": shard_files(data_root, split), "nanogpt": [nanogpt] if nanogpt.is_file() else [],
                 "llm.c": sorted(p for p in data_root.glob(f"*_{split}*.bin") if llmc_name.search(p.name))}
    found = {fmt: paths for fmt, paths in by_format.items() if paths}
    if not found:
        looked = ", ".join(FORMATS[fmt]["what"].format(split=split) for fmt in FORMATS)
        raise DataError(
            f"no {split} shards in {data_root} (looked for {looked}); run: {PREPARE_HINT.format(data_root)} "
            f"(or --source text / fineweb-edu; a val split needs --val_fraction > 0)"
        )
    if len(found) > 1:
        examples = " and ".join(paths[0].name for paths in found.values())
        raise DataError(f"{data_root} holds {split} tokens in {len(found)} formats ({examples}); which to read is not "
                        f"clear: move one format's files to a folder of their own")
    ((fmt, paths),) = found.items()
    return [read_token_file(path, fmt) for path in paths]


def read_token_file(path, fmt) -> TokenFile:
    """Check a token file before training reads it, so that a copy cut short fails now, not mid-run (or
    never): its header (npy: uint16, 1-D; llm.c: magic, version), and a size that is exactly the header's
    token count (nanoGPT's raw files: a whole number of uint16)."""
    remake = TokenFile(path, fmt, 0, 0).remake_hint()
    try:
        size = path.stat().st_size
        if fmt == "npy":
            offset, n_tokens = npy_header(path, size, remake)
        elif fmt == "llm.c":
            offset, n_tokens = llmc_header(path, size, remake)
        else:
            offset, n_tokens = 0, size // 2
            if size % 2:
                raise DataError(f"shard {path} has {size:,} bytes, not a whole number of uint16 tokens (a copy cut "
                                f"short?); {remake}")
            start = np.fromfile(path, dtype="<i4", count=3) if size >= 4 * LLMC_HEADER_INTS else None
            if start is not None and (start[0], start[1], 4 * LLMC_HEADER_INTS + 2 * start[2]) == (LLMC_MAGIC, 1, size):
                raise DataError(f"shard {path} starts with llm.c's header (magic {LLMC_MAGIC}), not with tokens as "
                                f"nanoGPT's {path.name} does; name it like llm.c's shards (e.g. "
                                f"data_{path.stem}_000000.bin) so that its header is read")
    except OSError as e:
        raise DataError(f"shard {path} cannot be read ({e}); {remake}") from None
    if n_tokens == 0:
        raise DataError(f"shard {path} is empty (0 tokens); delete it or {remake}")
    return TokenFile(path, fmt, offset, n_tokens)


def npy_header(path, size, remake):
    """(data offset, tokens) of a .npy shard: uint16, 1-D, and a file exactly as long as its header says."""
    try:
        with open(path, "rb") as f:
            version = np.lib.format.read_magic(f)
            read_header = {(1, 0): np.lib.format.read_array_header_1_0,
                           (2, 0): np.lib.format.read_array_header_2_0}.get(version)
            if read_header is None:
                raise ValueError(f"unsupported .npy format version {version}")
            shape, fortran_order, dtype = read_header(f)
            data_offset = f.tell()
    except (OSError, ValueError, EOFError) as e:
        raise DataError(f"shard {path} is not a readable .npy file ({e}); {remake}") from None
    if dtype != np.uint16:
        raise DataError(
            f"shard {path} has dtype {dtype}, expected uint16 (GPT-2 token ids fit in 16 bits); "
            f"convert it with np.save(path, np.load(path).astype(np.uint16)) or {remake}"
        )
    if len(shape) != 1:
        raise DataError(f"shard {path} has shape {shape}, expected a 1-D array of tokens; {remake}")
    check_size(path, size, data_offset, shape[0], remake)
    return data_offset, shape[0]


def llmc_header(path, size, remake):
    """(data offset, tokens) of an llm.c shard: magic, version 1 (uint16 tokens), and the header's count."""
    header_bytes = 4 * LLMC_HEADER_INTS
    if size < header_bytes:
        raise DataError(f"shard {path} has {size:,} bytes, less than llm.c's {header_bytes:,}-byte header; {remake}")
    header = np.fromfile(path, dtype="<i4", count=LLMC_HEADER_INTS)
    if header[0] != LLMC_MAGIC:
        raise DataError(f"shard {path} is not an llm.c token file: its header starts with {header[0]}, not the magic "
                        f"number {LLMC_MAGIC}; {remake} (nanoGPT's raw tokens are read from a file named train.bin "
                        f"or val.bin)")
    if header[1] != LLMC_VERSION:
        raise DataError(f"shard {path} is llm.c token file version {header[1]}; this loader reads version "
                        f"{LLMC_VERSION} (GPT-2's uint16 tokens)")
    check_size(path, size, header_bytes, int(header[2]), remake)
    return header_bytes, int(header[2])


def check_size(path, size, offset, n_tokens, remake):
    expected = offset + 2 * n_tokens
    if size != expected:
        what = "cut short" if size < expected else "longer than its header says"
        raise DataError(f"shard {path} is {what}: its header says {n_tokens:,} tokens ({expected:,} bytes) but the "
                        f"file has {size:,} bytes (an interrupted copy or write?); {remake}")


def check_token_ids(token_file, tokens, vocab_size):
    """A DataError if any of tokens (token_file's memory map) is vocab_size or more, naming the first such id
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
    raise DataError(f"shard {token_file.path} holds token id {token:,} at token {offset:,} (the first of those; the "
                    f"largest is {int(tokens.max()):,}), but the vocabulary has {vocab_size:,} ids (0 to "
                    f"{vocab_size - 1:,}): {what}. It was not tokenized with GPT-2's BPE, or is damaged; "
                    f"{token_file.remake_hint()}")


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


def listed(names):
    return ", ".join(names[:2]) + (", ..." if len(names) > 2 else "")


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
