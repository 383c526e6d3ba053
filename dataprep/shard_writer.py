"""Shards written so that an interrupted preparation continues where it stopped.

    with ShardFolder.open(out_dir, command, command_line, overwrite) as folder:   # start, resume, or refuse
        write_stream(folder, source, num_proc, max_shards)  # tokenize and pack, recording each finished shard
        finish_last_fraction(folder)                         # --val_split last_fraction: cut train and val

The folder's manifest, prepare_data.json, holds the command (source, name, shard size, val
split, the input files' sizes and times, ...) and one entry per finished shard: its file, tokens,
bytes, and where the stream stood after it: documents_done (items read into finished shards;
for text files an item is a piece of a file) and next_document_tokens_done (tokens of the next
item already in them). It is rewritten atomically after each shard, itself written atomically.
A resumed run checks that each recorded shard is there with its size, removes what the
interrupted run wrote after its last record, skips documents_done items of the stream without
tokenizing them, and drops the first next_document_tokens_done tokens of the next: its shards are
byte-identical to an uninterrupted run's.

--val_split first_shard (build-nanogpt's FineWeb-Edu layout): shard 0 is val, the rest train,
each written under its final name. --val_split last_fraction: the val split is the last
val_fraction of all tokens, so the stream is written as <name>_pending_NNNNNN.npy chunks first;
once it ends, the chunks that are all train are renamed, and the rest is cut into the last train
shard and the val shards (copied from the chunks, which are removed last).
"""
import json
import os
import re
from pathlib import Path

import numpy as np
from tqdm import tqdm

import files
from cli import log
from shards import DataError, shard_files, shard_path, write_shard

from .tokenizer_pool import tokenize

MANIFEST = "prepare_data.json"
LOCK = ".prepare_data.lock"  # one preparation per folder at a time
FORMAT = 1  # of the manifest; a folder written in another format is refused
PENDING = "pending"  # the split name of last_fraction's chunks before the val split is cut off

# How each command field is spelled on the command line, for the message that refuses another command.
FLAG_OF_FIELD = {
    "source": "--source", "name": "--name", "shard_size": "--shard_size", "val_split": "--val_split",
    "val_fraction": "--val_fraction", "text_field": "--text_field", "input": "--input",
    "dataset": "the dataset", "text_piece_chars": "the text piece size (TEXT_CHUNK_CHARS in dataprep/sources.py)",
}


def all_shards(out_dir):
    return shard_files(out_dir, "train") + shard_files(out_dir, "val")


def command_differences(old, new):
    """What differs between two commands, as flags; a changed source alone (its other fields follow from it)."""
    if old.get("source") != new.get("source"):
        return [describe_difference("source", old.get("source"), new.get("source"))]
    fields = dict.fromkeys(list(old) + list(new))
    in_both = [f for f in fields if f in old and f in new and old[f] != new[f]]
    # A field only one side has (val_fraction beside a changed val_split) is a consequence, unless alone.
    one_sided = [f for f in fields if (f in old) != (f in new)]
    return [describe_difference(f, old.get(f), new.get(f)) for f in in_both or one_sided]


def describe_difference(field, old, new):
    flag = FLAG_OF_FIELD.get(field, field)
    if field != "input" or old is None or new is None:
        return f"{flag} {old!r} there, {new!r} now"
    old_files, new_files = {f[0]: f[1:] for f in old}, {f[0]: f[1:] for f in new}
    gone, added = sorted(set(old_files) - set(new_files)), sorted(set(new_files) - set(old_files))
    if gone or added:
        parts = [f"{len(old)} files there, {len(new)} now"]
        parts += [f"missing now: {gone[0]}{' and more' if len(gone) > 1 else ''}"] if gone else []
        parts += [f"new: {added[0]}{' and more' if len(added) > 1 else ''}"] if added else []
        return f"--input: {'; '.join(parts)}"
    changed = next(path for path in old_files if old_files[path] != new_files[path])
    (old_bytes, _), (new_bytes, _) = old_files[changed], new_files[changed]
    how = f"{old_bytes:,} bytes then, {new_bytes:,} now" if old_bytes != new_bytes else "same size, modified since"
    return f"--input: {changed} changed ({how})"


class ShardFolder:
    """An output folder and its manifest. Open, it holds the folder's lock (one preparation per folder);
    leaving its with-block releases it."""

    def __init__(self, out_dir, manifest, lock):
        self.out_dir = Path(out_dir)
        self.manifest = manifest
        self.command = manifest["command"]
        self._lock = lock
        # Each chunk's JSON, made once: the manifest is rewritten after every shard, and serializing
        # all of it each time made thousands of small shards quadratic.
        self._chunk_json = [json.dumps(chunk) for chunk in manifest["chunks"]]

    # -- opening ------------------------------------------------------------------------------

    @classmethod
    def open(cls, out_dir, command, command_line, overwrite):
        """Start a new preparation, resume the one that command started, or refuse (DataError)
        without touching anything when the folder holds another command's shards."""
        out_dir = Path(out_dir)
        if out_dir.exists() and not out_dir.is_dir():
            raise DataError(f"--out_dir {out_dir} is a file, not a folder; choose another --out_dir")
        if not overwrite:
            refuse_other_work(out_dir, command)  # before the lock: a refused command creates no lock file
        lock = files.RunLock(out_dir, name=LOCK, holder="prepare_data.py", other="another --out_dir").acquire()
        try:
            old = read_manifest(out_dir / MANIFEST)
            if overwrite:
                clear_folder(out_dir, old)
            elif old is not None:
                folder = cls(out_dir, old, lock)
                folder.check_same_command(command)
                folder.check_files()
                return folder
            else:
                refuse_other_work(out_dir, command)
            folder = cls(out_dir, {"format": FORMAT, "command": command, "command_line": command_line,
                                   "chunks": [], "stream_done": False, "shards": None}, lock)
            folder.save()
            return folder
        except BaseException:
            lock.release()
            raise

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self._lock.release()  # a no-op when released already

    def check_same_command(self, command):
        if self.manifest.get("format") != FORMAT:
            raise DataError(f"{self.out_dir / MANIFEST} is in format {self.manifest.get('format')!r}, this script "
                            f"writes {FORMAT}; pass --overwrite to start over, or choose another --out_dir")
        differences = command_differences(self.command, command)
        if differences:
            raise DataError(
                f"{self.out_dir} holds shards of another command ({'; '.join(differences)}): "
                f"{self.manifest.get('command_line', 'see ' + str(self.out_dir / MANIFEST))}. Run that one to "
                f"continue or keep them, pass --overwrite to start over with this one, or choose another --out_dir")

    def check_files(self):
        """Every recorded shard is there with its size (cheap: no shard is read); a shard no record
        explains is refused in a finished folder and removed as the interrupted run's in an unfinished one."""
        expected = {}
        for path, size in self.recorded_files():
            actual = path.stat().st_size if path.exists() else None
            if actual != size:
                found = "is missing" if actual is None else f"has {actual:,} bytes"
                raise DataError(f"{path} {found}, but {MANIFEST} recorded {size:,} bytes: the folder changed after "
                                f"it was written; pass --overwrite to start over, or choose another --out_dir")
            expected[path.name] = size
        ours = re.compile(rf"{re.escape(self.command['name'])}_(train|val|{PENDING})_\d+\.npy")
        there = all_shards(self.out_dir) + sorted(self.out_dir.glob(f"*_{PENDING}_*.npy"))
        foreign = [p for p in there if not ours.fullmatch(p.name)]
        unrecorded = [p for p in there if ours.fullmatch(p.name) and p.name not in expected]
        # A finished folder may still hold chunks that its finish had not removed yet when it stopped.
        finish_leftovers = {chunk["file"] for chunk in self.chunks} if self.finished else set()
        unexplained = foreign + [p for p in unrecorded if self.finished and p.name not in finish_leftovers]
        if unexplained:
            raise DataError(f"{self.out_dir} holds {unexplained[0].name}, which its {MANIFEST} does not list; "
                            f"move it out, pass --overwrite to start over, or choose another --out_dir")
        if unrecorded:
            log(f"removing {len(unrecorded)} file{'s' if len(unrecorded) > 1 else ''} the interrupted run wrote "
                  f"after its last record ({unrecorded[0].name}{', ...' if len(unrecorded) > 1 else ''})")
            for path in unrecorded:
                path.unlink()
        remove_stale_temp_files(self.out_dir)

    def recorded_files(self):
        """(path, bytes) of the files the manifest says are there now."""
        if self.finished:
            return [(self.out_dir / s["file"], s["bytes"]) for s in self.manifest["shards"]]
        # last_fraction: an interrupted finish may have renamed the chunks that are all train to their shards.
        renamable = 0
        if self.stream_done and self.command["val_split"] == "last_fraction":
            renamable = self.train_tokens()[0] // self.command["shard_size"]
        recorded = []
        for index, chunk in enumerate(self.chunks):
            path = self.out_dir / chunk["file"]
            if index < renamable and not path.exists():  # finish_last_fraction had renamed it to its train shard
                path = shard_path(self.out_dir, self.command["name"], "train", index)
            recorded.append((path, chunk["bytes"]))
        return recorded

    # -- state ---------------------------------------------------------------------------------

    @property
    def chunks(self):
        return self.manifest["chunks"]

    @property
    def stream_done(self):
        return self.manifest["stream_done"]

    @property
    def finished(self):
        return self.manifest["shards"] is not None

    @property
    def shards(self):
        return self.manifest["shards"] or []

    def position(self):
        """(items of the stream in finished shards, tokens of the next item already in them)."""
        if not self.chunks:
            return 0, 0
        return self.chunks[-1]["documents_done"], self.chunks[-1]["next_document_tokens_done"]

    def train_tokens(self):
        """last_fraction: (tokens that go to train, tokens in all), as the whole-corpus cut made them."""
        total = sum(chunk["tokens"] for chunk in self.chunks)
        return int(total * (1 - self.command["val_fraction"])), total

    def save(self):
        entries = [f" {json.dumps(key)}: "
                   + (json_list(self._chunk_json, " ") if key == "chunks" else readable_json(value, " "))
                   for key, value in self.manifest.items()]
        text = "{\n" + ",\n".join(entries) + "\n}\n"
        files.atomic_write(self.out_dir / MANIFEST, lambda f: f.write(text.encode("utf-8")),
                           full_hint="Free some space, or write the shards to another folder (--out_dir)")

    def write_chunk(self, tokens, documents_done, next_document_tokens_done):
        """Write the stream's next chunk and record it, with where the stream stands after it."""
        index = len(self.chunks)
        split = ("val" if index == 0 else "train") if self.command["val_split"] == "first_shard" else PENDING
        path = shard_path(self.out_dir, self.command["name"], split, index)
        write_shard(path, tokens)
        self.chunks.append({"file": path.name, "tokens": len(tokens), "bytes": path.stat().st_size,
                            "documents_done": documents_done, "next_document_tokens_done": next_document_tokens_done})
        self._chunk_json.append(json.dumps(self.chunks[-1]))
        self.save()

    def finish_with(self, paths):
        """Record paths (in order) as the finished folder's shards."""
        self.manifest["stream_done"] = True
        self.manifest["shards"] = [{"file": p.name, "split": p.stem.rsplit("_", 2)[-2],
                                    "tokens": len(np.load(p, mmap_mode="r")), "bytes": p.stat().st_size}
                                   for p in paths]
        self.save()


def readable_json(value, indent=""):
    """JSON with each dict key on its own line and each list entry (a shard, an input file) on one line."""
    inner = indent + " "
    if isinstance(value, dict) and value:
        entries = [f"{inner}{json.dumps(key)}: {readable_json(item, inner)}" for key, item in value.items()]
        return "{\n" + ",\n".join(entries) + f"\n{indent}}}"
    if isinstance(value, list) and value and isinstance(value[0], (dict, list)):
        return json_list([json.dumps(item) for item in value], indent)
    return json.dumps(value)


def json_list(items_json, indent):
    """A JSON list of already serialized items, one a line."""
    if not items_json:
        return "[]"
    inner = indent + " "
    return "[\n" + ",\n".join(inner + item for item in items_json) + f"\n{indent}]"


def read_manifest(path):
    if not path.exists():
        return None
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
        missing = {"format", "command", "chunks", "stream_done", "shards"} - set(manifest)
        if missing:
            raise ValueError(f"no {', '.join(sorted(missing))}")
    except (OSError, ValueError, TypeError) as e:
        raise DataError(f"cannot read {path} ({type(e).__name__}: {e}); pass --overwrite to start over, "
                        f"or choose another --out_dir") from None
    return manifest


def refuse_other_work(out_dir, command):
    """A DataError if out_dir holds another command's shards, or shards no manifest describes. Reads only."""
    old = read_manifest(out_dir / MANIFEST)
    if old is not None:
        ShardFolder(out_dir, old, None).check_same_command(command)
    elif shards := all_shards(out_dir):
        raise DataError(f"{out_dir} already holds {len(shards)} shards ({shards[0].name}, ...) that no {MANIFEST} "
                        f"describes; pass --overwrite to replace them, or choose another --out_dir")


def clear_folder(out_dir, old_manifest):
    """--overwrite: remove the shards, chunks and manifest there (the source has been checked already)."""
    doomed = all_shards(out_dir) + sorted(out_dir.glob(f"*_{PENDING}_*.npy"))
    for path in doomed:
        path.unlink()
    (out_dir / MANIFEST).unlink(missing_ok=True)
    remove_stale_temp_files(out_dir)
    if doomed or old_manifest is not None:
        log(f"--overwrite: removed {len(doomed)} shards{' and ' + MANIFEST if old_manifest else ''} from {out_dir}")


def remove_stale_temp_files(out_dir):
    """The temp files of writes a kill interrupted (files.atomic_write's .NAME.tmpPID)."""
    if stale := files.remove_stale_temp_files(out_dir):
        log(f"removed {len(stale)} temp file{'s' if len(stale) > 1 else ''} of a write that was killed "
              f"({', '.join(stale)})")


# -----------------------------------------------------------------------------------------------
# Writing


def write_stream(folder, source, num_proc, max_shards=None, progress=True):
    """Tokenize source from where the folder's manifest stands and pack the tokens into shards of
    shard_size tokens, recording each; stops after max_shards shards in all (None: at the end).
    progress=False: no progress bar."""
    shard_size = folder.command["shard_size"]
    documents_done, tokens_done = folder.position()
    buffer = np.empty(shard_size, dtype=np.uint16)
    filled = 0
    progress = source.progress_bar() if progress else tqdm(disable=True)
    progress.set_postfix_str(f"{len(folder.chunks)} shards")
    token_batches = tokenize(source.items(skip=documents_done, progress=progress), num_proc)
    try:
        # first_item: the stream index of the batch's first item; already: its tokens in shards before the batch
        first_item, already = documents_done, tokens_done
        for tokens, lengths in token_batches:
            if already:
                if lengths[0] <= already:
                    raise DataError(f"the input no longer matches {folder.out_dir / MANIFEST}: item {first_item:,} "
                                    f"has {lengths[0]} tokens, {already} of which were recorded as written; pass "
                                    f"--overwrite to start over")
                tokens, lengths = tokens[already:], lengths.copy()
                lengths[0] -= already
            ends = np.cumsum(lengths)
            used = 0
            while used < len(tokens):
                take = min(shard_size - filled, len(tokens) - used)
                buffer[filled : filled + take] = tokens[used : used + take]
                filled += take
                used += take
                if filled < shard_size:
                    continue
                # Where the stream stands at this shard's end: items wholly in, tokens of the next.
                whole = int(np.searchsorted(ends, used, side="right"))
                start_of_next = int(ends[whole - 1]) if whole else 0
                next_done = 0 if whole == len(lengths) else used - start_of_next + (already if whole == 0 else 0)
                folder.write_chunk(buffer, first_item + whole, next_done)
                progress.set_postfix_str(f"{len(folder.chunks)} shards")
                filled = 0
                if max_shards is not None and len(folder.chunks) >= max_shards:
                    return
            first_item += len(lengths)
            already = 0
        if filled:
            folder.write_chunk(buffer[:filled], first_item, 0)
        if not folder.chunks:
            raise DataError("the input holds no documents (no tokens to write); check --input and --text_field")
        folder.manifest["stream_done"] = True
        if folder.command["val_split"] == "first_shard":
            folder.finish_with([folder.out_dir / chunk["file"] for chunk in folder.chunks])
        else:
            folder.save()
    finally:
        token_batches.close()  # stops the worker pool now, also when --max_shards or an error ends the loop
        progress.close()


def finish_last_fraction(folder):
    """Cut the recorded chunks into train shards (all but the last val_fraction of the tokens) and
    val shards, as the whole-corpus cut did: shards of shard_size, both splits numbered from 0.
    Safe to run again after an interruption: copies come first and read only chunks that are never
    renamed, the renames are checked one by one, and the chunks are removed after the record."""
    name, shard_size = folder.command["name"], folder.command["shard_size"]
    n_train, total = folder.train_tokens()
    chunk_paths = [folder.out_dir / chunk["file"] for chunk in folder.chunks]

    def tokens_between(start, stop):
        first, last = start // shard_size, (stop - 1) // shard_size
        parts = [np.load(chunk_paths[k], mmap_mode="r")[max(start - k * shard_size, 0): stop - k * shard_size]
                 for k in range(first, last + 1)]
        return np.concatenate(parts)

    whole_train_chunks = n_train // shard_size
    train = [shard_path(folder.out_dir, name, "train", k) for k in range(whole_train_chunks)]
    if n_train % shard_size:
        train.append(shard_path(folder.out_dir, name, "train", whole_train_chunks))
        write_shard(train[-1], tokens_between(whole_train_chunks * shard_size, n_train))
    val = []
    for index, start in enumerate(range(n_train, total, shard_size)):
        val.append(shard_path(folder.out_dir, name, "val", index))
        write_shard(val[-1], tokens_between(start, min(start + shard_size, total)))
    for chunk, shard in zip(chunk_paths, train[:whole_train_chunks]):
        if chunk.exists():
            os.replace(chunk, shard)  # the same bytes under the train name: no copy
    files.fsync_dir(folder.out_dir)
    folder.finish_with(train + val)
    for chunk in chunk_paths[whole_train_chunks:]:
        chunk.unlink(missing_ok=True)
