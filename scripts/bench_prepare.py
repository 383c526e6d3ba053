#!/usr/bin/env python3
"""Tokens per second of python -m scripts.prepare_data against tiktoken's own encode_ordinary on the same
text, per process. Prints a table; needs no network.

    python -m scripts.bench_prepare                                  # ~4 min on 2 cores
    python -m scripts.bench_prepare --copies 40 --num_proc 1 2 4 --repeats 5
    python -m scripts.bench_prepare --encoders             # tiktoken's three ways to numpy tokens, one process

The corpus is made offline: tiny Shakespeare (--corpus; default $TINYSHAKESPEARE_PATH or
../shared/data/tinyshakespeare.txt) cut at blank lines into documents of at least --doc_chars
characters (4000: about FineWeb-Edu's mean), repeated --copies times, and written once as JSON
lines (one document per line) and once as text files (one per copy).

Each run is paired with tiktoken's encode_ordinary over the same documents in this process just
before it: GPT-2's BPE with nothing around it, at that moment (on a machine others share, its
rate drifts by tens of percent within minutes). Rows: tiktoken split among N forked processes
(what the machine allows N processes at all), then prepare_data.py for each form and --num_proc:
reading, tokenizing in the worker processes, packing, writing shards and the manifest, not the
process start-up. "% best" is the row's best tokens/s per process over tiktoken's best in one
process (the quiet moments of each); "% median pair" the median over the runs of tokens/s per
process over its paired baseline; "% CPU" the best tokens per CPU second (the main process and
its workers) over tiktoken's best. With num_proc equal to the core count, the main process
(reading, sending the text, packing, writing) competes with the workers for the cores.
"""
import contextlib
import io
import json
import multiprocessing
import os
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

if __name__ == "__main__" and not __package__:  # started as a path: say the command that works, exit 2
    from _as_module import exit_with_module_command  # scripts/ is sys.path[0] here; it imports nothing of ours
    exit_with_module_command(__file__)

SHARED = Path(__file__).resolve().parent.parent.parent / "shared"
if "TIKTOKEN_CACHE_DIR" not in os.environ and (SHARED / "tiktoken_cache").is_dir():
    os.environ["TIKTOKEN_CACHE_DIR"] = str(SHARED / "tiktoken_cache")  # offline machines: the local copy
if "TINYSHAKESPEARE_PATH" not in os.environ and (SHARED / "data" / "tinyshakespeare.txt").is_file():
    os.environ["TINYSHAKESPEARE_PATH"] = str(SHARED / "data" / "tinyshakespeare.txt")
import cli  # noqa: E402
import shards  # noqa: E402
from dataprep.sources import TINYSHAKESPEARE_URL  # noqa: E402
from scripts import prepare_data  # noqa: E402


def make_documents(corpus, doc_chars):
    """The corpus cut at blank lines into documents of at least doc_chars characters."""
    if corpus is None or not Path(corpus).is_file():
        raise cli.UserError(f"no corpus at {corpus or '$TINYSHAKESPEARE_PATH'}; pass --corpus FILE (any UTF-8 "
                            f"text), e.g. after: curl -L -o tinyshakespeare.txt {TINYSHAKESPEARE_URL}")
    text = Path(corpus).read_text(encoding="utf-8")
    documents, current = [], ""
    for paragraph in text.split("\n\n"):
        current = f"{current}\n\n{paragraph}" if current else paragraph
        if len(current) >= doc_chars:
            documents.append(current)
            current = ""
    return documents + ([current] if current else [])


def write_corpus(folder, documents, copies):
    (folder / "jsonl").mkdir()
    (folder / "text").mkdir()
    with open(folder / "jsonl" / "corpus.jsonl", "w", encoding="utf-8") as f:
        for _ in range(copies):
            f.writelines(json.dumps({"text": doc}) + "\n" for doc in documents)
    for copy in range(copies):
        (folder / "text" / f"copy{copy:03d}.txt").write_text("\n\n".join(documents), encoding="utf-8")


def cpu_seconds():
    """CPU time (user + system) of this process and of its children that have ended (the pool's workers)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


_work = None  # (encoder, documents, copies, processes): what forked tiktoken workers read


def encode_share(index):
    """Worker `index`'s share of the documents, encoded; returns its token count."""
    encoder, documents, copies, processes = _work
    return sum(len(encoder.encode_ordinary(doc)) for _ in range(copies) for doc in documents[index::processes])


def time_tiktoken(documents, copies, processes):
    """encode_ordinary over the documents: in this process, or split among forked processes
    (each with its share, nothing sent back but a count): the rate the machine itself allows."""
    global _work
    _work = (shards.get_tokenizer(), documents, copies, processes)
    start, start_cpu = time.perf_counter(), cpu_seconds()
    if processes == 1:
        tokens = encode_share(0)
    else:
        pool = multiprocessing.get_context("fork").Pool(processes)
        tokens = sum(pool.map(encode_share, range(processes)))
        pool.close()
        pool.join()  # the workers' CPU time counts once they have ended
    return tokens, time.perf_counter() - start, cpu_seconds() - start_cpu


def time_prepare(folder, form, num_proc, shard_size):
    out_dir = folder / f"out_{form}_{num_proc}"
    shutil.rmtree(out_dir, ignore_errors=True)
    args = ["--source", "text" if form == "text" else "jsonl", "--input", str(folder / form / "*"), "--name", "bench",
            "--out_dir", str(out_dir), "--num_proc", str(num_proc), "--shard_size", str(shard_size)]
    quiet = io.StringIO()
    start, start_cpu = time.perf_counter(), cpu_seconds()
    with contextlib.redirect_stdout(quiet), contextlib.redirect_stderr(quiet):  # the progress bars
        status = prepare_data.run(args)
    seconds, cpu = time.perf_counter() - start, cpu_seconds() - start_cpu
    if status:
        raise cli.UserError(f"prepare_data.py {' '.join(args)} exited {status}: {quiet.getvalue()[-500:]}")
    tokens = sum(len(np.load(p, mmap_mode="r")) for p in out_dir.glob("bench_*.npy"))
    return tokens, seconds, cpu


def compare_encoders(documents, repeats):
    """Seconds for the documents, best of repeats (interleaved), for each way from text to numpy tokens;
    the workers use encode_to_numpy (dataprep.tokenizer_pool.encode)."""
    encoder = shards.get_tokenizer()
    ways = {"encode_ordinary, then np.array": lambda d: np.array(encoder.encode_ordinary(d), dtype=np.uint32),
            "encode_ordinary (a list)": encoder.encode_ordinary,
            "encode_to_numpy": lambda d: encoder.encode_to_numpy(d, allowed_special=set(), disallowed_special=())}
    best = dict.fromkeys(ways, float("inf"))
    for _ in range(repeats):
        for name, way in ways.items():
            start = time.perf_counter()
            for document in documents:
                way(document)
            best[name] = min(best[name], time.perf_counter() - start)
    tokens = sum(len(encoder.encode_ordinary(d)) for d in documents)
    print(f"{len(documents):,} documents, {tokens:,} tokens; best of {repeats}, interleaved; 1-minute load average "
          f"{os.getloadavg()[0]:.2f}")
    for name, seconds in best.items():
        print(f"{name:32s} {seconds * 1000:8.1f} ms  {seconds / best['encode_ordinary (a list)']:.3f} x the list's")
    return 0


def run(argv=None):
    parser = cli.ArgumentParser(description=__doc__)
    parser.add_argument("--corpus", default=os.environ.get("TINYSHAKESPEARE_PATH"),
                        help="UTF-8 text to cut into documents (default: $TINYSHAKESPEARE_PATH, set to "
                             "../shared/data/tinyshakespeare.txt when that exists)")
    parser.add_argument("--copies", type=cli.positive_int, default=20,
                        help="times tiny Shakespeare (1.1 MB, ~338k tokens) is repeated")
    parser.add_argument("--doc_chars", type=cli.positive_int, default=4000,
                        help="least characters per document, cut at blank lines")
    parser.add_argument("--num_proc", type=cli.positive_int, nargs="+", default=[1, 2],
                        help="prepare_data.py --num_proc values to time")
    parser.add_argument("--shard_size", type=cli.positive_int, default=1_000_000, help="tokens per shard")
    parser.add_argument("--repeats", type=cli.positive_int, default=8,
                        help="runs per row, each paired with a tiktoken run just before it")
    parser.add_argument("--encoders", action="store_true",
                        help="only time encode_ordinary, it with np.array, and encode_to_numpy on the documents "
                             "(--repeats each), in this process")
    args = parser.parse_args(argv)

    documents = make_documents(args.corpus, args.doc_chars)
    if args.encoders:
        return compare_encoders(documents, args.repeats)
    load_before = os.getloadavg()[0]  # others' work on a shared machine slows some runs down
    folder = Path(tempfile.mkdtemp(prefix="bench_prepare_"))
    try:
        write_corpus(folder, documents, args.copies)
        corpus_bytes = (folder / "jsonl" / "corpus.jsonl").stat().st_size
        configs = [("tiktoken", n) for n in args.num_proc if n > 1]
        configs += [(form, n) for form in ("jsonl", "text") for n in args.num_proc]
        baselines, pairs = [], {config: [] for config in configs}
        for _ in range(args.repeats):
            for form, num_proc in configs:
                # Each run is paired with tiktoken in one process just before it: what the machine
                # gives one process at that moment.
                baselines.append(time_tiktoken(documents, args.copies, 1))
                run_ = (time_tiktoken(documents, args.copies, num_proc) if form == "tiktoken"
                        else time_prepare(folder, form, num_proc, args.shard_size))
                pairs[form, num_proc].append((run_, baselines[-1]))
    finally:
        shutil.rmtree(folder)

    tokens = baselines[0][0]
    print(f"corpus: tiny Shakespeare x {args.copies}: {len(documents) * args.copies:,} documents of >= "
          f"{args.doc_chars} characters, {tokens:,} tokens ({corpus_bytes / 1e6:.1f} MB as JSON lines); "
          f"{os.cpu_count()} CPU cores; runs per row: {args.repeats}; shards of {args.shard_size:,} tokens; "
          f"1-minute load average {load_before:.2f} before, {os.getloadavg()[0]:.2f} after")
    rates = sorted(n / seconds for n, seconds, _ in baselines)
    baseline, baseline_per_cpu = rates[-1], max(n / cpu for n, _, cpu in baselines)
    print(f"tiktoken encode_ordinary, 1 process, {len(rates)} runs: best {int(baseline):,} tokens/s, "
          f"median {int(rates[len(rates) // 2]):,}, worst {int(rates[0]):,}")
    print(f"{'what':28s} {'procs':>5s} {'tokens/s':>11s} {'per proc':>10s} {'% best':>7s} {'% median pair':>13s} "
          f"{'% CPU':>6s}")
    for (form, num_proc), runs in pairs.items():
        for (n_tokens, _, _), _ in runs:
            if form == "jsonl" and n_tokens != tokens + len(documents) * args.copies:  # each document: EOT + tokens
                raise cli.UserError(f"prepare_data.py wrote {n_tokens:,} tokens for the JSON lines, expected "
                                    f"{tokens + len(documents) * args.copies:,}")
        rate = max(n_tokens / seconds for (n_tokens, seconds, _), _ in runs)
        per_cpu = max(n_tokens / cpu for (n_tokens, _, cpu), _ in runs)
        shares = sorted(n / s / num_proc / (bn / bs) for (n, s, _), (bn, bs, _) in runs)
        # Percentages truncated, never rounded up.
        best, median = int(1000 * rate / num_proc / baseline) / 10, int(1000 * shares[len(shares) // 2]) / 10
        cpu_share = int(1000 * per_cpu / baseline_per_cpu) / 10
        what = "tiktoken encode_ordinary" if form == "tiktoken" else f"prepare_data --source {form}"
        print(f"{what:28s} {num_proc:5d} {int(rate):11,d} {int(rate / num_proc):10,d} {best:6.1f}% {median:12.1f}% "
              f"{cpu_share:5.1f}%")
    return 0


def main(argv=None):
    return cli.main(run, argv)


if __name__ == "__main__":
    sys.exit(main())
