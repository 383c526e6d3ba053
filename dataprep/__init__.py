"""Data preparation: documents tokenized with GPT-2's BPE into the shards the loader reads, resumably.
The library behind `python -m scripts.prepare_data`; no torch.

    import dataprep

    source = dataprep.open_source("jsonl", input=["crawl/*.jsonl.gz"], text_field="text")   # checked now
    dataprep.prepare(source, "data/crawl", name="crawl", val_split="first_shard", num_proc=8,
                     command_line="...")      # start, continue an interrupted run, or refuse other shards
    dataprep.ensure_tinyshakespeare("data/tinyshakespeare")   # the trainer's quickstart data, once

    dataprep.SOURCES             --source name -> class; a new source is one class and one row (sources.py)
    dataprep.SHARD_SIZE, VAL_FRACTION   the defaults

Modules, each importing only those before it: sources (where documents come from), tokenizer_pool
(tokens from worker processes, in order), shard_writer (the folder's manifest: resume, refuse,
finish), prepare (one preparation from start to end).
"""
from .prepare import SHARD_SIZE, VAL_FRACTION, ensure_tinyshakespeare, prepare
from .sources import SOURCES, open_source

__all__ = ["SHARD_SIZE", "SOURCES", "VAL_FRACTION", "ensure_tinyshakespeare", "open_source", "prepare"]
