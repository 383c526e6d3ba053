"""scripts/prepare_data.py resumes: killed or interrupted anywhere, the same command ends with the
shards of an uninterrupted run, byte for byte; another command on a used folder is refused."""
import gzip
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import REPO_ROOT
from dataprep import shard_writer, tokenizer_pool
from scripts import prepare_data

# A stand-in for Hugging Face datasets, put on the path of the process under test: it streams the
# documents of $FAKE_DATASETS_DOCS, writes the index of each one it yields to $FAKE_DATASETS_LOG
# (so a test sees which documents were read), waits $FAKE_DATASETS_DELAY_S before each, and drops
# the connection at document $FAKE_DATASETS_FAIL_AT.
FAKE_DATASETS = '''
import json, os, time

class Stream:
    def __init__(self, documents, start=0):
        self.documents, self.start = documents, start

    def skip(self, n):
        return Stream(self.documents, self.start + n)

    def __iter__(self):
        delay = float(os.environ.get("FAKE_DATASETS_DELAY_S", "0"))
        fail_at = int(os.environ.get("FAKE_DATASETS_FAIL_AT", "-1"))
        for index in range(self.start, len(self.documents)):
            if index == fail_at:
                raise ConnectionError("connection reset by peer")
            time.sleep(delay)
            with open(os.environ["FAKE_DATASETS_LOG"], "a") as log:
                log.write(f"{index}\\n")
            yield {"text": self.documents[index], "id": str(index)}

def load_dataset(path, name=None, split=None, streaming=False):
    assert (path, name, split, streaming) == ("HuggingFaceFW/fineweb-edu", "sample-10BT", "train", True)
    with open(os.environ["FAKE_DATASETS_DOCS"]) as f:
        return Stream(json.load(f))
'''

# A slow disk for the process under test, so that it is still writing when the test kills it.
SLOW_FSYNC = '''
import os, time
_fsync = os.fsync
def _slow_fsync(fd):
    time.sleep(float(os.environ.get("SLOW_FSYNC_S", "0")))
    _fsync(fd)
os.fsync = _slow_fsync
'''


def shakespeare_documents(path, n, chars):
    """n documents of about `chars` characters each, cut from tiny Shakespeare at line ends."""
    text = path.read_text()
    documents, start = [], 0
    for i in range(n):
        stop = text.find("\n", start + chars // 2 + (i * 7919) % chars) + 1 or len(text)
        documents.append(text[start:stop])
        start = stop % (len(text) - 2 * chars)
    return documents


def write_corpus(folder, form, documents):
    """documents as `form` files in folder; returns the --source and --input of prepare_data.py."""
    folder.mkdir(parents=True, exist_ok=True)
    if form == "text":
        for i in range(0, len(documents), 10):  # one file per 10 documents
            (folder / f"part{i:04d}.txt").write_text("".join(documents[i:i + 10]))
        return ["--source", "text", "--input", str(folder / "*.txt")]
    if form == "jsonl":
        half = len(documents) // 2
        (folder / "a.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in documents[:half]))
        with gzip.open(folder / "b.jsonl.gz", "wt") as f:
            f.writelines(json.dumps({"text": d}) + "\n" for d in documents[half:])
        return ["--source", "jsonl", "--input", str(folder / "*.jsonl*")]
    if form == "parquet":
        pyarrow = pytest.importorskip("pyarrow")
        import pyarrow.parquet as pq

        pq.write_table(pyarrow.table({"text": documents}), folder / "000_00000.parquet", row_group_size=3)
        return ["--source", "parquet", "--input", str(folder / "*.parquet")]
    raise ValueError(form)


@pytest.fixture
def fake_datasets(tmp_path, monkeypatch):
    """The fake datasets package for this process and for subprocesses (returns their env)."""
    package = tmp_path / "fake_site" / "datasets"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text(FAKE_DATASETS)
    monkeypatch.syspath_prepend(str(package.parent))
    monkeypatch.delitem(sys.modules, "datasets", raising=False)
    monkeypatch.setenv("FAKE_DATASETS_LOG", str(tmp_path / "read.log"))
    return package.parent


def fineweb_docs(tmp_path, tinyshakespeare_path, monkeypatch, n=120, chars=3000):
    documents = shakespeare_documents(tinyshakespeare_path, n, chars)
    (tmp_path / "docs.json").write_text(json.dumps(documents))
    monkeypatch.setenv("FAKE_DATASETS_DOCS", str(tmp_path / "docs.json"))
    return documents


def read_log(tmp_path):
    """The indices of the documents the fake stream yielded since the last call."""
    log = tmp_path / "read.log"
    indices = [int(line) for line in log.read_text().split()] if log.exists() else []
    log.unlink(missing_ok=True)
    return indices


def snapshot(folder):
    """{name: bytes} of every file in folder, hidden ones included."""
    return {p.name: p.read_bytes() for p in sorted(Path(folder).iterdir()) if p.is_file()}


def shards_of(folder):
    return {name: data for name, data in snapshot(folder).items() if name.endswith(".npy")}


def manifest(folder):
    return json.loads((Path(folder) / shard_writer.MANIFEST).read_text())


def run(args):
    """prepare_data's exit status (cli.main raises SystemExit on an error)."""
    try:
        return prepare_data.main([str(a) for a in args])
    except SystemExit as exit_:
        return exit_.code


def kill_when_a_shard_is_recorded(args, out_dir, env_extra, timeout=60):
    """Start prepare_data.py, SIGKILL it (and its workers) once its manifest records a finished shard
    and before it ends; returns the manifest as the kill left it."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", **env_extra)
    process = subprocess.Popen([sys.executable, "-m", "scripts.prepare_data"] + [str(a) for a in args],
                               cwd=REPO_ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    deadline = time.monotonic() + timeout
    try:
        while True:
            assert process.poll() is None, f"it ended before it was killed: {process.stderr.read().decode()[-2000:]}"
            assert time.monotonic() < deadline, "no shard was recorded in time"
            try:
                if manifest(out_dir)["chunks"]:
                    break
            except (OSError, ValueError):
                pass  # not written yet
            time.sleep(0.005)
    finally:
        os.killpg(process.pid, signal.SIGKILL)  # the whole process group: the main process and its pool
        process.wait()
    left = manifest(out_dir)
    assert left["shards"] is None and not left["stream_done"]  # killed midway
    return left


# -----------------------------------------------------------------------------------------------
# kill -9 of a real process


@pytest.mark.parametrize("form", ["text", "jsonl"])
def test_kill_9_then_the_same_command_gives_the_uninterrupted_shards(tmp_path, tinyshakespeare_path, form):
    source = write_corpus(tmp_path / "in", form, shakespeare_documents(tinyshakespeare_path, 60, 1500))
    args = source + ["--name", "corpus", "--shard_size", 1000, "--num_proc", 2]
    assert run(args + ["--out_dir", tmp_path / "whole"]) == 0
    site = tmp_path / "slow_site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(SLOW_FSYNC)
    killed = tmp_path / "killed"
    left = kill_when_a_shard_is_recorded(args + ["--out_dir", killed], killed,
                                         {"PYTHONPATH": str(site), "SLOW_FSYNC_S": "0.01"})
    assert run(args + ["--out_dir", killed]) == 0
    assert shards_of(killed) == shards_of(tmp_path / "whole")
    assert not [name for name in snapshot(killed) if ".tmp" in name]  # no temp file left behind
    assert manifest(killed)["chunks"][: len(left["chunks"])] == left["chunks"]  # the finished shards were kept


def test_kill_9_of_the_fineweb_stream_skips_the_documents_in_finished_shards(tmp_path, tinyshakespeare_path,
                                                                             monkeypatch, fake_datasets):
    # ~7k tokens a document, ~1 MB of text (one worker task) every ~33 documents: the stream is
    # read in several tasks, and most shards end inside a document.
    documents = fineweb_docs(tmp_path, tinyshakespeare_path, monkeypatch, n=120, chars=30_000)
    args = ["--source", "fineweb-edu", "--shard_size", 10_000, "--num_proc", 2]
    assert run(args + ["--out_dir", tmp_path / "whole"]) == 0
    assert read_log(tmp_path) == list(range(len(documents)))
    killed = tmp_path / "killed"
    left = kill_when_a_shard_is_recorded(args + ["--out_dir", killed], killed,
                                         {"PYTHONPATH": str(fake_datasets), "FAKE_DATASETS_DELAY_S": "0.01"})
    read_log(tmp_path)
    assert run(args + ["--out_dir", killed]) == 0
    assert shards_of(killed) == shards_of(tmp_path / "whole")
    documents_done = left["chunks"][-1]["documents_done"]
    assert 0 < documents_done < len(documents) and left["chunks"][-1]["next_document_tokens_done"] > 0
    # The resumed stream started after the documents of the finished shards: none was read or tokenized again.
    assert read_log(tmp_path) == list(range(documents_done, len(documents)))


def test_a_dropped_fineweb_connection_is_one_error_line_and_the_rerun_continues(tmp_path, tinyshakespeare_path,
                                                                                monkeypatch, fake_datasets, capsys):
    documents = fineweb_docs(tmp_path, tinyshakespeare_path, monkeypatch)
    monkeypatch.setattr(tokenizer_pool, "BATCH_CHARS", 20_000)  # tasks of ~7 documents: shards finish before the drop
    args = ["--source", "fineweb-edu", "--shard_size", 1000, "--num_proc", 1]
    assert run(args + ["--out_dir", tmp_path / "whole"]) == 0
    monkeypatch.setenv("FAKE_DATASETS_FAIL_AT", "70")
    read_log(tmp_path)
    assert run(args + ["--out_dir", tmp_path / "dropped"]) == 1
    err = capsys.readouterr().err
    assert "error: the FineWeb-Edu stream failed after 70 documents (ConnectionError: connection reset by peer); " \
           "run the same command again" in err and "Traceback" not in err
    documents_done = manifest(tmp_path / "dropped")["chunks"][-1]["documents_done"]
    monkeypatch.delenv("FAKE_DATASETS_FAIL_AT")
    read_log(tmp_path)
    assert run(args + ["--out_dir", tmp_path / "dropped"]) == 0
    assert shards_of(tmp_path / "dropped") == shards_of(tmp_path / "whole")
    assert read_log(tmp_path) == list(range(documents_done, len(documents)))
    assert f"skipping the {documents_done:,} documents in them without tokenizing" in capsys.readouterr().out


# -----------------------------------------------------------------------------------------------
# An interruption at every write (in this process: Ctrl-C raised from inside the write)


def interrupting(function, n, counts=lambda *args: True):
    """function, except that its n-th call (of the calls that `counts`) raises KeyboardInterrupt first;
    .calls counts them. A plain function, so that it binds as a method too."""
    def wrapper(*args, **kwargs):
        if counts(*args):
            wrapper.calls += 1
            if wrapper.calls == n:
                raise KeyboardInterrupt
        return function(*args, **kwargs)

    wrapper.calls, wrapper.function = 0, function
    return wrapper


def is_chunk_rename(source, target=None):
    return "_pending_" in Path(source).name and not Path(source).name.startswith(".")


WRITES = {"write_shard": (shard_writer, "write_shard", lambda *a: True),
          "manifest": (shard_writer.ShardFolder, "save", lambda *a: True),
          "rename": (os, "replace", is_chunk_rename)}


@pytest.mark.parametrize("form, layout", [("text", "last_fraction"), ("jsonl", "first_shard"),
                                          ("jsonl", "last_fraction"), ("parquet", "first_shard")])
def test_interrupted_at_any_write_the_rerun_gives_the_uninterrupted_shards(tmp_path, tinyshakespeare_path,
                                                                           monkeypatch, capsys, form, layout):
    source = write_corpus(tmp_path / "in", form, shakespeare_documents(tinyshakespeare_path, 12, 1200))
    args = source + ["--name", "c", "--shard_size", 700, "--num_proc", 1, "--val_split", layout]
    whole = tmp_path / "whole"
    counters = {kind: interrupting(getattr(owner, name), 0, counts) for kind, (owner, name, counts) in WRITES.items()}
    for kind, (owner, name, _) in WRITES.items():
        monkeypatch.setattr(owner, name, counters[kind])
    assert run(args + ["--out_dir", whole]) == 0
    calls = {kind: counter.calls for kind, counter in counters.items()}
    assert calls["write_shard"] >= 6 and (calls["rename"] > 0) == (layout == "last_fraction")
    expected = shards_of(whole)
    for kind, (owner, name, counts) in WRITES.items():
        for n in range(1, calls[kind] + 1):
            out_dir = tmp_path / f"{kind}{n}"
            monkeypatch.setattr(owner, name, interrupting(counters[kind].function, n, counts))
            assert run(args + ["--out_dir", out_dir]) == 130, (kind, n)
            assert "interrupted: " in capsys.readouterr().err
            monkeypatch.setattr(owner, name, counters[kind].function)
            assert run(args + ["--out_dir", out_dir]) == 0, (kind, n)
            assert shards_of(out_dir) == expected, (kind, n)
            assert manifest(out_dir)["shards"] is not None


# -----------------------------------------------------------------------------------------------
# A used folder: refused for another command, done when finished, --overwrite starts over


@pytest.fixture
def finished_jsonl(tmp_path, tinyshakespeare_path):
    source = write_corpus(tmp_path / "in", "jsonl", shakespeare_documents(tinyshakespeare_path, 8, 1000))
    args = source + ["--name", "c", "--shard_size", 500, "--num_proc", 1, "--out_dir", tmp_path / "out"]
    assert run(args) == 0
    return args, tmp_path / "out"


def change_input(args):
    path = Path(args[args.index("--input") + 1]).parent / "a.jsonl"
    path.write_text(path.read_text() + json.dumps({"text": "one more"}) + "\n")
    return args, f"--input: {path.resolve()} changed ("


@pytest.mark.parametrize("change", [
    lambda a: (a + ["--shard_size", 600], "--shard_size 500 there, 600 now"),
    lambda a: (a + ["--text_field", "body"], "--text_field 'text' there, 'body' now"),
    lambda a: (a + ["--val_split", "last_fraction"], "--val_split 'first_shard' there, 'last_fraction' now"),
    lambda a: (["--source", "text"] + a[2:], "--source 'jsonl' there, 'text' now"),
    change_input,
], ids=["shard_size", "text_field", "val_split", "source", "input"])
def test_another_command_on_a_used_folder_is_refused_and_touches_nothing(finished_jsonl, capsys, change):
    args, out_dir = finished_jsonl
    before = {p.name: p.stat().st_mtime_ns for p in out_dir.iterdir()}, snapshot(out_dir)
    other, difference = change(list(args))
    assert run(other) == 1
    err = capsys.readouterr().err
    assert f"error: {out_dir} holds shards of another command (" in err and difference in err, err
    assert "pass --overwrite to start over" in err and "Traceback" not in err and len(err.splitlines()) == 1
    assert ({p.name: p.stat().st_mtime_ns for p in out_dir.iterdir()}, snapshot(out_dir)) == before


def test_a_finished_folder_says_so_and_exits_0_without_writing(finished_jsonl, capsys):
    args, out_dir = finished_jsonl
    capsys.readouterr()
    def written():  # the lock file names whoever held the folder last: every run writes it
        return {p.name: p.stat().st_mtime_ns for p in out_dir.iterdir() if p.name != ".prepare_data.lock"}

    before = written()
    assert run(args) == 0
    out = capsys.readouterr().out
    assert out.strip().splitlines() == [f"{out_dir} is already finished ({len(shards_of(out_dir))} shards); "
                                        f"nothing to do (--overwrite starts over)"]
    assert written() == before


def test_overwrite_starts_over_with_the_new_command(finished_jsonl, tmp_path):
    args, out_dir = finished_jsonl
    old = set(shards_of(out_dir))
    assert run(args + ["--shard_size", 2000, "--overwrite"]) == 0
    fresh = tmp_path / "fresh"
    assert run(args + ["--shard_size", 2000, "--out_dir", fresh]) == 0
    assert shards_of(out_dir) == shards_of(fresh) and len(old) > len(shards_of(fresh))
    assert manifest(out_dir)["command"]["shard_size"] == 2000


def test_a_recorded_shard_that_changed_is_refused(finished_jsonl, capsys):
    args, out_dir = finished_jsonl
    shard = out_dir / "c_train_000001.npy"
    np.save(shard, np.zeros(3, dtype=np.uint16))
    assert run(args) == 1
    err = capsys.readouterr().err
    assert f"{shard} has 134 bytes, but {shard_writer.MANIFEST} recorded 1,128 bytes" in err


def test_max_shards_stops_and_a_larger_one_continues(tmp_path, tinyshakespeare_path, monkeypatch, fake_datasets,
                                                     capsys):
    documents = fineweb_docs(tmp_path, tinyshakespeare_path, monkeypatch, n=40, chars=2000)
    monkeypatch.setattr(tokenizer_pool, "BATCH_CHARS", 10_000)  # so the stream is read in several tasks
    args = ["--source", "fineweb-edu", "--shard_size", 1000, "--num_proc", 1, "--out_dir", tmp_path / "edu"]
    assert run(args + ["--max_shards", 2]) == 0
    assert sorted(shards_of(tmp_path / "edu")) == ["edufineweb_train_000001.npy", "edufineweb_val_000000.npy"]
    assert run(args + ["--max_shards", 2]) == 0
    assert "already holds 2 shards, as --max_shards 2 asks" in capsys.readouterr().out
    documents_done = manifest(tmp_path / "edu")["chunks"][-1]["documents_done"]
    read_log(tmp_path)
    assert run(args + ["--max_shards", 4]) == 0
    assert read_log(tmp_path)[0] == documents_done
    assert run(args[:-1] + [tmp_path / "fresh", "--max_shards", 4]) == 0
    assert shards_of(tmp_path / "edu") == shards_of(tmp_path / "fresh") and len(shards_of(tmp_path / "fresh")) == 4
    assert len(documents) > documents_done
