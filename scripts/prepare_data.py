#!/usr/bin/env python3
"""Tokenize a corpus with GPT-2's BPE into uint16 shards that dataloader.py streams.

    python scripts/prepare_data.py --source tinyshakespeare                 # -> data/tinyshakespeare
    python scripts/prepare_data.py --source text --input 'books/*.txt' --name mybooks
    python scripts/prepare_data.py --source jsonl --input 'crawl/*.jsonl.gz' --name crawl --text_field content
    python scripts/prepare_data.py --source parquet --input 'fineweb-edu/sample/10BT/*.parquet' --name edufineweb
    python scripts/prepare_data.py --source fineweb-edu                     # -> data/edu_fineweb10B

Every document starts with <|endoftext|> (50256), as in build-nanogpt. --val_split first_shard,
build-nanogpt's FineWeb-Edu layout and the default for jsonl, parquet and fineweb-edu: shard 0 is
val, the rest train (<name>_val_000000.npy, <name>_train_000001.npy, ...). --val_split
last_fraction, the default for text and tinyshakespeare: the last --val_fraction of all tokens is
val (<name>_train_000000.npy, ..., <name>_val_000000.npy, ...).

Stopped by anything (Ctrl-C, kill -9, a dropped connection), the same command run again continues
where it stopped and ends with the shards an uninterrupted run writes; on a finished folder it says
so. The folder's prepare_data.json records the command and each finished shard (docs/DATA.md).
"""
import os
import shlex
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import cli  # noqa: E402
import data_sources  # noqa: E402
from dataloader import ensure_tinyshakespeare  # noqa: E402
from shard_writer import MANIFEST, ShardFolder, finish_last_fraction, write_stream  # noqa: E402
from tokenizer_pool import load_tokenizer  # noqa: E402

FILE_SOURCES = ("text", "jsonl", "parquet")
DEFAULT_VAL_SPLIT = {"tinyshakespeare": "last_fraction", "text": "last_fraction", "jsonl": "first_shard",
                     "parquet": "first_shard", "fineweb-edu": "first_shard"}
DEFAULT_OUT_DIRS = {"tinyshakespeare": "data/tinyshakespeare", "fineweb-edu": "data/edu_fineweb10B"}
NAMES = {"tinyshakespeare": "tinyshakespeare", "fineweb-edu": "edufineweb"}  # file sources take --name


def open_source(args):
    """The source, checked (inputs found, optional package there) before the folder is touched."""
    if args.source == "text":
        return data_sources.TextFiles(args.input)
    if args.source == "jsonl":
        return data_sources.JsonLines(args.input, args.text_field)
    if args.source == "parquet":
        return data_sources.ParquetFiles(args.input, args.text_field)
    if args.source == "fineweb-edu":
        return data_sources.FineWebEdu()
    return None  # tiny Shakespeare: dataloader.ensure_tinyshakespeare reads it


def command_of(args, source):
    """What must be the same for a run to continue the folder's shards (not --num_proc, --max_shards)."""
    command = {"source": args.source, "name": args.name, "val_split": args.val_split}
    if args.source != "tinyshakespeare":  # its two shards are one per split, whatever the shard size
        command["shard_size"] = args.shard_size
    if args.val_split == "last_fraction":
        command["val_fraction"] = args.val_fraction
    if source is not None:
        command.update(source.identity())
    return command


def plural(n, word):
    return f"{n:,} {word}{'' if n == 1 else 's'}"


def summary(shards):
    """Lines per split: shard count and tokens, from [{"file", "tokens"}]."""
    lines = []
    for split in ("train", "val"):
        sizes = [s["tokens"] for s in shards if s["file"].rsplit("_", 2)[-2] == split]
        lines.append(f"  {split:5s} {plural(len(sizes), 'shard')}, {sum(sizes):,} tokens")
    return lines


def say_what_happens(args, source, folder):
    items = "pieces" if args.source == "text" else "documents"
    if folder.chunks:
        done, _ = folder.position()
        tokens = sum(chunk["tokens"] for chunk in folder.chunks)
        print(f"resuming {args.out_dir}: {plural(len(folder.chunks), 'shard')} finished ({tokens:,} tokens); "
              f"skipping the {done:,} {items} in them without tokenizing")
    inputs = plural(len(source.paths), "file") if args.source in FILE_SOURCES else args.source
    layout = ("the first shard is val" if args.val_split == "first_shard"
              else f"the last {args.val_fraction:g} of the tokens is val")
    print(f"tokenizing {inputs} with {args.num_proc} process{'' if args.num_proc == 1 else 'es'} into shards of "
          f"{args.shard_size:,} tokens in {args.out_dir}; {layout} (--val_split {args.val_split})")


def prepare(args, source, folder):
    if folder.finished:
        print(f"{args.out_dir} is already finished ({plural(len(folder.shards), 'shard')}); nothing to do "
              f"(--overwrite starts over)")
        return
    if args.source == "tinyshakespeare":
        # 1 MB of text, one document, one shard per split: one process tokenizes it in a second,
        # and an interrupted run simply makes them again.
        ensure_tinyshakespeare(args.out_dir, val_fraction=args.val_fraction)
        folder.finish_with([p for split in ("train", "val")
                            for p in sorted(Path(args.out_dir).glob(f"tinyshakespeare_{split}_*.npy"))])
    if not folder.stream_done:
        if args.max_shards is not None and len(folder.chunks) >= args.max_shards:
            print(f"{args.out_dir} already holds {plural(len(folder.chunks), 'shard')}, as --max_shards "
                  f"{args.max_shards} asks; pass a larger --max_shards to continue")
            return
        say_what_happens(args, source, folder)
        write_stream(folder, source, args.num_proc, args.max_shards)
    if not folder.stream_done:
        print(f"stopped after {plural(len(folder.chunks), 'shard')} (--max_shards); in {args.out_dir}:")
        print("\n".join(summary(folder.chunks)))
        return
    if not folder.finished:
        finish_last_fraction(folder)
    print(f"wrote {plural(len(folder.shards), 'shard')} to {args.out_dir}:")
    print("\n".join(summary(folder.shards)))
    if args.val_split == "first_shard" and len(folder.shards) == 1:
        print("only one shard: it is the val split and there is no train split; use a smaller --shard_size, "
              "or --val_split last_fraction")


def parse_args(argv):
    parser = cli.ArgumentParser(description=__doc__)
    parser.add_argument("--source", required=True, choices=list(DEFAULT_VAL_SPLIT),
                        help="corpus to tokenize (required)")
    parser.add_argument("--input", nargs="+", default=[], metavar="GLOB",
                        help="text, jsonl, parquet: files or quoted globs ('books/**/*.txt'). text: each file is "
                             "one document, read in ~256K-character pieces cut at blank lines ('\\n\\n'); jsonl: one "
                             "JSON object per line, .gz files unzipped on the fly; parquet: one row per document "
                             "(default: none)")
    parser.add_argument("--name", help="text, jsonl, parquet: dataset name, the shards' prefix "
                                       "(<name>_train_000001.npy); required")
    parser.add_argument("--text_field", help="jsonl: the key, parquet: the column that holds each document's "
                                             "text (default: text)")
    parser.add_argument("--out_dir", help="directory for the shards (default: data/tinyshakespeare, data/<name>, "
                                          "or data/edu_fineweb10B by source)")
    parser.add_argument("--val_split", choices=["first_shard", "last_fraction"],
                        help="first_shard: shard 0 is val, the rest train (build-nanogpt's FineWeb-Edu layout); "
                             "last_fraction: the last --val_fraction of all tokens is val (default: last_fraction "
                             "for text and tinyshakespeare, first_shard for jsonl, parquet and fineweb-edu)")
    parser.add_argument("--val_fraction", type=float,
                        help="--val_split last_fraction: the fraction of tokens, at the end, that goes to val "
                             "(default: 0.1)")
    parser.add_argument("--shard_size", type=cli.positive_int, default=100_000_000,
                        help="tokens per shard (default: 100000000, 200 MB as uint16; tinyshakespeare: one shard "
                             "per split)")
    parser.add_argument("--max_shards", type=cli.positive_int, default=None,
                        help="--val_split first_shard: stop after this many shards, val included; a larger value "
                             "later continues (default: all; ~100 for fineweb-edu)")
    parser.add_argument("--num_proc", type=cli.positive_int, default=max(1, (os.cpu_count() or 1) // 2),
                        help="tokenizer processes (default: half the CPU cores, here %(default)s)")
    parser.add_argument("--overwrite", action="store_true",
                        help="delete the shards already in --out_dir and start over (default: refuse another "
                             "command's shards, continue this command's)")
    args = parser.parse_args(argv)
    file_source = args.source in FILE_SOURCES
    if file_source and not (args.input and args.name):
        parser.error(f"--source {args.source} needs --input GLOB [GLOB ...] and --name NAME")
    if not file_source and (args.input or args.name):
        parser.error(f"--input and --name are for --source text, jsonl or parquet, not --source {args.source}")
    if args.name is not None and (not args.name or "/" in args.name or os.sep in args.name):
        parser.error(f"--name {args.name!r} must be a plain file name prefix, e.g. mybooks")
    if args.text_field is not None and args.source not in ("jsonl", "parquet"):
        parser.error(f"--text_field is for --source jsonl or parquet, not --source {args.source}")
    args.text_field = args.text_field or "text"
    args.name = args.name or NAMES[args.source]
    args.val_split = args.val_split or DEFAULT_VAL_SPLIT[args.source]
    fixed = {"tinyshakespeare": "last_fraction", "fineweb-edu": "first_shard"}.get(args.source)
    if fixed and args.val_split != fixed:
        parser.error(f"--source {args.source} has one layout, --val_split {fixed}")
    if args.val_split == "first_shard" and args.val_fraction is not None:
        parser.error("--val_fraction is for --val_split last_fraction; with first_shard the first shard is val")
    if args.val_split == "last_fraction" and args.max_shards is not None:
        parser.error("--max_shards is for --val_split first_shard: last_fraction needs every token to cut off val")
    if args.val_fraction is None:
        args.val_fraction = 0.1
    if not 0 <= args.val_fraction < 1:
        parser.error(f"--val_fraction must be in [0, 1), got {args.val_fraction}")
    if args.out_dir is None:
        args.out_dir = f"data/{args.name}" if file_source else DEFAULT_OUT_DIRS[args.source]
    return args


def run(argv=None):
    argv = sys.argv[1:] if argv is None else [str(a) for a in argv]
    args = parse_args(argv)
    source = open_source(args)
    load_tokenizer()  # a missing BPE file or an old tiktoken is reported before the folder is touched
    command_line = shlex.join(["python", "scripts/prepare_data.py", *argv])
    try:
        with ShardFolder.open(args.out_dir, command_of(args, source), command_line, args.overwrite) as folder:
            prepare(args, source, folder)
    except KeyboardInterrupt:
        print(f"\ninterrupted: the shards finished so far are recorded in {Path(args.out_dir) / MANIFEST}; "
              f"run the same command again to continue", file=sys.stderr)
        return 130
    return 0


def main(argv=None):
    return cli.main(run, argv)


if __name__ == "__main__":
    sys.exit(main())
