"""One preparation from start to end: a source's documents into a folder of shards, resumably.

    prepare(source, out_dir, name=..., val_split=..., command_line=...)   start, continue or refuse; the summary
    ensure_tinyshakespeare(data_dir)                                       the trainer's quickstart data, once
"""
import shlex
from pathlib import Path

from cli import log
from shards import shard_files

from .shard_writer import MANIFEST, ShardFolder, finish_last_fraction, read_manifest, write_stream
from .sources import open_source, plural
from .tokenizer_pool import load_tokenizer

SHARD_SIZE = 100_000_000  # tokens per shard: 200 MB as uint16, build-nanogpt's FineWeb-Edu shards
VAL_FRACTION = 0.1  # --val_split last_fraction: the share of the tokens, at the end, that is val


def summary(shards):
    """Lines per split: shard count and tokens, from [{"file", "tokens"}]."""
    lines = []
    for split in ("train", "val"):
        sizes = [s["tokens"] for s in shards if s["file"].rsplit("_", 2)[-2] == split]
        lines.append(f"  {split:5s} {plural(len(sizes), 'shard')}, {sum(sizes):,} tokens")
    return lines


def say_what_happens(folder, source, num_proc):
    command, out_dir = folder.command, folder.out_dir
    if folder.chunks:
        done, _ = folder.position()
        tokens = sum(chunk["tokens"] for chunk in folder.chunks)
        log(f"resuming {out_dir}: {plural(len(folder.chunks), 'shard')} finished ({tokens:,} tokens); "
              f"skipping the {done:,} {source.items_are} in them without tokenizing")
    layout = ("the first shard is val" if command["val_split"] == "first_shard"
              else f"the last {command['val_fraction']:g} of the tokens is val")
    log(f"tokenizing {source.describe()} with {num_proc} process{'' if num_proc == 1 else 'es'} into shards of "
          f"{command['shard_size']:,} tokens in {out_dir}; {layout} (--val_split {command['val_split']})")


def prepare(source, out_dir, *, name, val_split, command_line, val_fraction=VAL_FRACTION, shard_size=SHARD_SIZE,
            num_proc=1, max_shards=None, overwrite=False, verbose=True):
    """Tokenize source (sources.open_source) into out_dir: start, continue an interrupted run of the same
    command, or refuse (DataError) a folder that holds other shards. command_line is what the manifest
    records, for the message that refuses another command. verbose=False drops the progress bar and the
    lines about what is done (the trainer's quickstart says one line of its own).
    Returns the finished folder's shards ([{"file", "split", "tokens", "bytes"}]), or None when
    max_shards stopped it first."""
    load_tokenizer()  # a missing BPE file or an old tiktoken is reported before the folder is touched
    # What must be the same for a run to continue the folder's shards (not num_proc, max_shards).
    command = {"source": source.key, "name": name, "val_split": val_split, "shard_size": shard_size}
    if val_split == "last_fraction":
        command["val_fraction"] = val_fraction
    command.update(source.identity())
    with ShardFolder.open(out_dir, command, command_line, overwrite) as folder:
        if folder.finished:
            if verbose:
                log(f"{out_dir} is already finished ({plural(len(folder.shards), 'shard')}); nothing to do "
                      f"(--overwrite starts over)")
            return folder.shards
        if not folder.stream_done:
            if max_shards is not None and len(folder.chunks) >= max_shards:
                log(f"{out_dir} already holds {plural(len(folder.chunks), 'shard')}, as --max_shards "
                      f"{max_shards} asks; pass a larger --max_shards to continue")
                return None
            if verbose:
                say_what_happens(folder, source, num_proc)
            write_stream(folder, source, num_proc, max_shards, progress=verbose)
        if not folder.stream_done:
            log(f"stopped after {plural(len(folder.chunks), 'shard')} (--max_shards); in {out_dir}:")
            log("\n".join(summary(folder.chunks)))
            return None
        if not folder.finished:
            finish_last_fraction(folder)
        if verbose:
            log(f"wrote {plural(len(folder.shards), 'shard')} to {out_dir}:")
            log("\n".join(summary(folder.shards)))
            if val_split == "first_shard" and len(folder.shards) == 1:
                log("only one shard: it is the val split and there is no train split; use a smaller "
                      "--shard_size, or --val_split last_fraction")
        return folder.shards


def ensure_tinyshakespeare(data_dir) -> bool:
    """The quickstart's data: make tiny Shakespeare shards in data_dir unless its train shards are there
    (a finished preparation, or shards made some other way), exactly as
    `python -m scripts.prepare_data --source tinyshakespeare --out_dir data_dir` makes them, manifest
    included; an interrupted one is continued. The text is one document, EOT then its tokens; the last
    10% of the tokens is val. True when it wrote shards."""
    data_dir = Path(data_dir)
    manifest = read_manifest(data_dir / MANIFEST)
    overwrite = False
    if manifest is None and shard_files(data_dir, "train"):
        return False
    if manifest is not None and manifest["shards"] is not None:
        if all((data_dir / shard["file"]).is_file() for shard in manifest["shards"]):
            return False
        log(f"{data_dir}: shards its {MANIFEST} lists are gone; preparing tiny Shakespeare there again")
        overwrite = True  # the quickstart's own folder, which only the trainer fills: start it over
    source = open_source("tinyshakespeare", out_dir=data_dir)
    command_line = shlex.join(["python", "-m", "scripts.prepare_data", "--source", "tinyshakespeare",
                               "--out_dir", str(data_dir)])
    shards = prepare(source, data_dir, name=source.name, val_split="last_fraction", command_line=command_line,
                     overwrite=overwrite, verbose=False)
    tokens = {split: sum(s["tokens"] for s in shards if s["split"] == split) for split in ("train", "val")}
    log(f"prepared {source.describe()}: {tokens['train']:,} train + {tokens['val']:,} val tokens in {data_dir}")
    return True
