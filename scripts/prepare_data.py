#!/usr/bin/env python3
"""Tokenize a corpus with GPT-2's BPE into uint16 shards that dataloader.py streams.

    python -m scripts.prepare_data --source tinyshakespeare                 # -> data/tinyshakespeare
    python -m scripts.prepare_data --source text --input 'books/*.txt' --name mybooks
    python -m scripts.prepare_data --source jsonl --input 'crawl/*.jsonl.gz' --name crawl --text_field content
    python -m scripts.prepare_data --source parquet --input 'fineweb-edu/sample/10BT/*.parquet' --name edufineweb
    python -m scripts.prepare_data --source fineweb-edu                     # -> data/edu_fineweb10B

Every document starts with <|endoftext|> (50256), as in build-nanogpt. --val_split first_shard,
build-nanogpt's FineWeb-Edu layout and the default for jsonl, parquet and fineweb-edu: shard 0 is
val, the rest train (<name>_val_000000.npy, <name>_train_000001.npy, ...). --val_split
last_fraction, the default for text and tinyshakespeare: the last --val_fraction of all tokens is
val (<name>_train_000000.npy, ..., <name>_val_000000.npy, ...).

Stopped by anything (Ctrl-C, kill -9, a dropped connection), the same command run again continues
where it stopped and ends with the shards an uninterrupted run writes; on a finished folder it says
so. The folder's prepare_data.json records the command and each finished shard (docs/DATA.md).
This is the command line of the dataprep package, which does the work; its sources are dataprep.SOURCES.
"""
import os
import shlex
import sys
from pathlib import Path

if __name__ == "__main__" and not __package__:  # started as a path: say the command that works, exit 2
    from _as_module import exit_with_module_command  # scripts/ is sys.path[0] here; it imports nothing of ours
    exit_with_module_command(__file__)

import cli  # noqa: E402
import dataprep  # noqa: E402
from dataprep.shard_writer import MANIFEST  # noqa: E402


def takes(option):
    """The --source names whose class takes an option ("input", "text_field")."""
    return [key for key, cls in dataprep.SOURCES.items() if option in cls.options]


def either(names):
    return ", ".join(names[:-1]) + f" or {names[-1]}" if len(names) > 1 else names[0]


def parse_args(argv):
    sources = dataprep.SOURCES
    by_default_layout = {layout: [key for key, cls in sources.items() if cls.layouts[0] == layout]
                         for layout in ("last_fraction", "first_shard")}
    named = [key for key, cls in sources.items() if cls.name is None]  # the user names the dataset
    parser = cli.ArgumentParser(description=__doc__)
    parser.add_argument("--source", required=True, choices=list(sources), help="corpus to tokenize (required)")
    parser.add_argument("--input", nargs="+", default=[], metavar="GLOB",
                        help=f"{', '.join(takes('input'))}: files or quoted globs ('books/**/*.txt'). text: each "
                             "file is one document, read in ~256K-character pieces cut at blank lines ('\\n\\n'); "
                             "jsonl: one JSON object per line, .gz files unzipped on the fly; parquet: one row per "
                             "document (default: none)")
    parser.add_argument("--name", help=f"{', '.join(named)}: dataset name, the shards' prefix "
                                       "(<name>_train_000001.npy); required")
    parser.add_argument("--text_field", help=f"{', '.join(takes('text_field'))}: the JSON key or parquet column "
                                             "that holds each document's text (default: text)")
    parser.add_argument("--out_dir", help="directory for the shards (default: data/<name>, or "
                                          + ", ".join(f"{cls.out_dir} for {key}" for key, cls in sources.items()
                                                      if cls.out_dir) + ")")
    parser.add_argument("--val_split", choices=["first_shard", "last_fraction"],
                        help="first_shard: shard 0 is val, the rest train (build-nanogpt's FineWeb-Edu layout); "
                             "last_fraction: the last --val_fraction of all tokens is val (default: last_fraction "
                             f"for {either(by_default_layout['last_fraction'])}, first_shard for "
                             f"{either(by_default_layout['first_shard'])})")
    parser.add_argument("--val_fraction", type=float,
                        help="--val_split last_fraction: the fraction of tokens, at the end, that goes to val "
                             f"(default: {dataprep.VAL_FRACTION})")
    parser.add_argument("--shard_size", type=cli.positive_int, default=dataprep.SHARD_SIZE,
                        help=f"tokens per shard (default: {dataprep.SHARD_SIZE}, {dataprep.SHARD_SIZE * 2 // 10**6} "
                             "MB as uint16)")
    parser.add_argument("--max_shards", type=cli.positive_int, default=None,
                        help="--val_split first_shard: stop after this many shards, val included; a larger value "
                             "later continues (default: all; ~100 for fineweb-edu)")
    parser.add_argument("--num_proc", type=cli.positive_int, default=max(1, (os.cpu_count() or 1) // 2),
                        help="tokenizer processes (default: half the CPU cores, here %(default)s)")
    parser.add_argument("--overwrite", action="store_true",
                        help="delete the shards already in --out_dir and start over (default: refuse another "
                             "command's shards, continue this command's)")
    args = parser.parse_args(argv)
    cls = sources[args.source]
    takes_files = "input" in cls.options
    if takes_files and not (args.input and (args.name or cls.name)):
        parser.error(f"--source {args.source} needs --input GLOB [GLOB ...] and --name NAME")
    if not takes_files and (args.input or args.name):
        parser.error(f"--input and --name are for --source {either(takes('input'))}, not --source {args.source}")
    if args.name is not None and (not args.name or "/" in args.name or os.sep in args.name):
        parser.error(f"--name {args.name!r} must be a plain file name prefix, e.g. mybooks")
    if args.text_field is not None and "text_field" not in cls.options:
        parser.error(f"--text_field is for --source {either(takes('text_field'))}, not --source {args.source}")
    args.text_field = args.text_field or "text"
    args.name = args.name or cls.name
    args.val_split = args.val_split or cls.layouts[0]
    if args.val_split not in cls.layouts:
        parser.error(f"--source {args.source} has one layout, --val_split {cls.layouts[0]}")
    if args.val_split == "first_shard" and args.val_fraction is not None:
        parser.error("--val_fraction is for --val_split last_fraction; with first_shard the first shard is val")
    if args.val_split == "last_fraction" and args.max_shards is not None:
        parser.error("--max_shards is for --val_split first_shard: last_fraction needs every token to cut off val")
    args.val_fraction = dataprep.VAL_FRACTION if args.val_fraction is None else args.val_fraction
    if not 0 <= args.val_fraction < 1:
        parser.error(f"--val_fraction must be in [0, 1), got {args.val_fraction}")
    if args.out_dir is None:
        args.out_dir = cls.out_dir or f"data/{args.name}"
    return args


def run(argv=None):
    argv = sys.argv[1:] if argv is None else [str(a) for a in argv]
    args = parse_args(argv)
    # Made, and so checked (inputs found, optional package there), before the folder is touched.
    source = dataprep.open_source(args.source, input=args.input, text_field=args.text_field, out_dir=args.out_dir)
    try:
        dataprep.prepare(source, args.out_dir, name=args.name, val_split=args.val_split,
                         val_fraction=args.val_fraction, shard_size=args.shard_size, num_proc=args.num_proc,
                         max_shards=args.max_shards, overwrite=args.overwrite,
                         command_line=shlex.join(["python", "-m", "scripts.prepare_data", *argv]))
    except KeyboardInterrupt:
        print(f"\ninterrupted: the shards finished so far are recorded in {Path(args.out_dir) / MANIFEST}; "
              f"run the same command again to continue", file=sys.stderr)
        return 130
    return 0


def main(argv=None):
    return cli.main(run, argv)


if __name__ == "__main__":
    sys.exit(main())
