"""scripts/prepare_data.py: every source writes shards the loader reads, with EOT-led documents."""
import io
import os
import subprocess
import sys
import types
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest

import dataprep
from conftest import REPO_ROOT, run_main
from dataloader import ShardedDataLoader
from dataprep import sources, tokenizer_pool
from scripts import prepare_data
from shards import EOT_TOKEN, DataError, get_tokenizer, shard_path, write_shard



def read_split(out_dir, split):
    paths = sorted(Path(out_dir).glob(f"*_{split}_*.npy"))
    return [p.name for p in paths], np.concatenate([np.load(p) for p in paths]) if paths else np.zeros(0, np.uint16)


def decode(tokens):
    return get_tokenizer().decode(tokens.tolist())


def test_tinyshakespeare_shards_decode_to_the_text(tmp_path, tinyshakespeare_path, capsys):
    out_dir = tmp_path / "shakespeare"
    assert prepare_data.main(["--source", "tinyshakespeare", "--out_dir", str(out_dir)]) == 0
    train_names, train = read_split(out_dir, "train")
    val_names, val = read_split(out_dir, "val")
    assert train_names == ["tinyshakespeare_train_000000.npy"] and val_names == ["tinyshakespeare_val_000000.npy"]
    assert train[0] == EOT_TOKEN
    assert decode(np.concatenate([train[1:], val])) == tinyshakespeare_path.read_text()
    assert f"{len(train):,} tokens" in capsys.readouterr().out  # the summary
    x, _ = ShardedDataLoader(out_dir, "val", 4, 64).next_batch()
    assert x.flatten().tolist() == val[: 4 * 64].tolist()


def test_tinyshakespeare_shards_are_byte_identical_to_the_old_writer(tmp_path, tinyshakespeare_path, capsys):
    """The quickstart's shards as the old writer made them (EOT + the tokens, the last 10% val, np.save), so
    training losses stay comparable with runs on the old shards; the trainer's path and the command's agree."""
    tokens = np.array([EOT_TOKEN] + get_tokenizer().encode_ordinary(tinyshakespeare_path.read_text()), np.uint16)
    n_train = int(len(tokens) * 0.9)
    old = {}
    for split, part in (("train", tokens[:n_train]), ("val", tokens[n_train:])):
        buffer = io.BytesIO()
        np.save(buffer, part)
        old[f"tinyshakespeare_{split}_000000.npy"] = buffer.getvalue()

    assert dataprep.ensure_tinyshakespeare(tmp_path / "quickstart") is True
    assert f"prepared tiny Shakespeare from {tinyshakespeare_path}: {n_train:,} train + " in capsys.readouterr().out
    assert prepare_data.main(["--source", "tinyshakespeare", "--out_dir", tmp_path / "command"]) == 0
    for folder in ("quickstart", "command"):
        assert {p.name: p.read_bytes() for p in (tmp_path / folder).glob("*.npy")} == old, folder

    assert dataprep.ensure_tinyshakespeare(tmp_path / "quickstart") is False  # once
    capsys.readouterr()
    assert prepare_data.main(["--source", "tinyshakespeare", "--out_dir", tmp_path / "quickstart"]) == 0
    assert "is already finished (2 shards)" in capsys.readouterr().out  # one manifest for both paths


def test_ensure_tinyshakespeare_makes_shards_that_decode_to_the_text(tmp_path, tinyshakespeare_path):
    assert dataprep.ensure_tinyshakespeare(tmp_path) is True
    train = np.load(shard_path(tmp_path, "tinyshakespeare", "train", 0))
    val = np.load(shard_path(tmp_path, "tinyshakespeare", "val", 0))
    assert train.dtype == val.dtype == np.uint16
    assert train[0] == EOT_TOKEN and EOT_TOKEN not in train[1:] and EOT_TOKEN not in val
    assert len(train) == int(0.9 * (len(train) + len(val)))
    assert get_tokenizer().decode(np.concatenate([train[1:], val]).tolist()) == tinyshakespeare_path.read_text()
    assert dataprep.ensure_tinyshakespeare(tmp_path) is False  # already there: nothing to do


def refuse_network(*args, **kwargs):
    raise urllib.error.URLError("no route to host")


def test_ensure_tinyshakespeare_download_failure_says_how_to_fix(tmp_path, monkeypatch):
    monkeypatch.delenv("TINYSHAKESPEARE_PATH", raising=False)
    monkeypatch.setattr(urllib.request, "urlopen", refuse_network)
    with pytest.raises(DataError) as error:
        dataprep.ensure_tinyshakespeare(tmp_path / "data")
    message = str(error.value)
    assert sources.TINYSHAKESPEARE_URL in message and "no route to host" in message
    assert str(tmp_path / "data" / "tinyshakespeare.txt") in message and "TINYSHAKESPEARE_PATH" in message


def test_ensure_tinyshakespeare_downloads_once_then_uses_the_cached_copy(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("TINYSHAKESPEARE_PATH", raising=False)
    text = "First Citizen:\nBefore we proceed any further, hear me speak.\n" * 20
    monkeypatch.setattr(urllib.request, "urlopen", lambda url, timeout: io.BytesIO(text.encode()))
    assert dataprep.ensure_tinyshakespeare(tmp_path)
    assert (tmp_path / "tinyshakespeare.txt").read_text() == text

    for shard in tmp_path.glob("*.npy"):
        shard.unlink()
    monkeypatch.setattr(urllib.request, "urlopen", refuse_network)  # offline now: the cache must do
    capsys.readouterr()
    assert dataprep.ensure_tinyshakespeare(tmp_path)
    out = capsys.readouterr().out
    assert "shards its prepare_data.json lists are gone; preparing tiny Shakespeare there again" in out
    assert np.load(shard_path(tmp_path, "tinyshakespeare", "train", 0))[0] == EOT_TOKEN


def test_ensure_tinyshakespeare_leaves_shards_made_some_other_way(tmp_path):
    write_shard(shard_path(tmp_path, "mine", "train", 0), np.arange(100))
    assert dataprep.ensure_tinyshakespeare(tmp_path) is False
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine_train_000000.npy"]


def test_refuses_to_overwrite_shards_unless_asked(tmp_path, tinyshakespeare_path, capsys):
    out_dir = tmp_path / "shakespeare"
    args = ["--source", "tinyshakespeare", "--out_dir", str(out_dir)]
    assert prepare_data.main(args) == 0
    stale = out_dir / "tinyshakespeare_train_000007.npy"
    stale.write_bytes(b"from an older run")
    assert run_main(prepare_data.main, args) == 1
    assert "--overwrite" in capsys.readouterr().err and stale.exists()
    assert prepare_data.main(args + ["--overwrite"]) == 0
    assert not stale.exists()  # old shards would otherwise mix into the new dataset
    assert read_split(out_dir, "train")[0] == ["tinyshakespeare_train_000000.npy"]


def test_text_source_glob_of_two_files(tmp_path):
    (tmp_path / "books").mkdir()
    (tmp_path / "books" / "a.txt").write_text("The first book.\n\nIt has two paragraphs.\n" * 30)
    (tmp_path / "books" / "b.txt").write_text("The second book, shorter.\n" * 10)
    (tmp_path / "books" / "notes.md").write_text("not matched by the glob")
    out_dir = tmp_path / "out"
    assert prepare_data.main(["--source", "text", "--input", str(tmp_path / "books" / "*.txt"), "--name", "mybooks",
                              "--out_dir", str(out_dir), "--shard_size", "200", "--num_proc", "2"]) == 0
    train_names, train = read_split(out_dir, "train")
    val_names, val = read_split(out_dir, "val")
    assert train_names[:2] == ["mybooks_train_000000.npy", "mybooks_train_000001.npy"]
    assert all(len(np.load(out_dir / name)) == 200 for name in train_names[:-1])
    tokens = np.concatenate([train, val])
    assert len(train) == int(0.9 * len(tokens))  # val is the last 10% of the tokens
    assert tokens[0] == EOT_TOKEN and np.count_nonzero(tokens == EOT_TOKEN) == 2  # one per document
    expected = "<|endoftext|>" + (tmp_path / "books" / "a.txt").read_text() + "<|endoftext|>" + (
        tmp_path / "books" / "b.txt").read_text()
    assert decode(tokens) == expected


def test_large_files_cut_at_blank_lines_tokenize_like_the_whole(tmp_path, tinyshakespeare_path, monkeypatch):
    """Pieces shared among the workers must not change a single token, nor add an EOT."""
    monkeypatch.setattr(sources, "TEXT_CHUNK_CHARS", 50_000)  # tiny Shakespeare: ~22 pieces
    assert len(list(sources.paragraph_pieces(io.StringIO(tinyshakespeare_path.read_text()).read, 50_000))) > 10
    assert prepare_data.main(["--source", "text", "--input", str(tinyshakespeare_path), "--name", "shk",
                              "--out_dir", str(tmp_path / "text"), "--num_proc", "2"]) == 0
    assert prepare_data.main(["--source", "tinyshakespeare", "--out_dir", str(tmp_path / "whole")]) == 0
    for split in ("train", "val"):
        assert np.array_equal(read_split(tmp_path / "text", split)[1], read_split(tmp_path / "whole", split)[1])


def test_text_source_that_is_not_utf8_names_the_file(tmp_path, capsys):
    (tmp_path / "good.txt").write_text("fine\n")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9\n".encode("latin-1"))
    assert run_main(prepare_data.main, ["--source", "text", "--input", str(tmp_path / "*.txt"), "--name", "x",
                      "--out_dir", str(tmp_path / "out"), "--num_proc", "2"]) == 1
    err = capsys.readouterr().err
    assert "latin1.txt is not UTF-8" in err and "Traceback" not in err


FAKE_DOCS = [f"Document number {i} is about {'tokens ' * (5 + i)}." for i in range(12)]


@pytest.fixture
def fake_datasets(monkeypatch):
    calls = []

    def load_dataset(path, name=None, split=None, streaming=False):
        calls.append((path, name, split, streaming))
        return iter([{"text": text, "id": str(i)} for i, text in enumerate(FAKE_DOCS)])

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    return calls


def test_fineweb_edu_writes_val_first_build_nanogpt_layout(tmp_path, fake_datasets):
    out_dir = tmp_path / "edu"
    assert prepare_data.main(["--source", "fineweb-edu", "--out_dir", str(out_dir), "--shard_size", "40",
                              "--num_proc", "2"]) == 0
    assert fake_datasets == [("HuggingFaceFW/fineweb-edu", "sample-10BT", "train", True)]
    names = sorted(p.name for p in out_dir.glob("*.npy"))
    assert names[-1] == "edufineweb_val_000000.npy"
    assert names[:-1] == [f"edufineweb_train_{i:06d}.npy" for i in range(1, len(names))]
    shards = [np.load(out_dir / f"edufineweb_{'val' if i == 0 else 'train'}_{i:06d}.npy") for i in range(len(names))]
    assert all(len(shard) == 40 for shard in shards[:-1])
    tokens = np.concatenate(shards)
    assert decode(tokens) == "".join("<|endoftext|>" + text for text in FAKE_DOCS)


def test_fineweb_edu_max_shards_stops_early(tmp_path, fake_datasets):
    out_dir = tmp_path / "edu"
    assert prepare_data.main(["--source", "fineweb-edu", "--out_dir", str(out_dir), "--shard_size", "40",
                              "--max_shards", "2", "--num_proc", "2"]) == 0
    assert sorted(p.name for p in out_dir.glob("*.npy")) == ["edufineweb_train_000001.npy",
                                                             "edufineweb_val_000000.npy"]


def test_fineweb_edu_without_datasets_says_pip_install(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "datasets", None)  # makes `import datasets` raise ImportError
    assert run_main(prepare_data.main, ["--source", "fineweb-edu", "--out_dir", str(tmp_path / "edu")]) == 1
    err = capsys.readouterr().err
    assert "pip install datasets" in err and "Traceback" not in err
    assert not list(tmp_path.glob("edu/*.npy"))


@pytest.mark.parametrize("args, rc, message", [
    (["--source", "text", "--name", "x"], 2, "--source text needs --input"),
    (["--source", "text", "--input", "no/such/dir/*.txt", "--name", "x", "--out_dir", "{tmp}/out"], 1,
     "error: no files match --input 'no/such/dir/*.txt'"),
])
def test_cli_bad_arguments_exit_nonzero_with_a_message(tmp_path, args, rc, message):
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    result = subprocess.run([sys.executable, "-m", "scripts.prepare_data"] + args, capture_output=True, text=True,
                            cwd=tmp_path, env=dict(os.environ, PYTHONPATH=str(REPO_ROOT)))
    assert result.returncode == rc
    assert message in result.stderr and "Traceback" not in result.stderr


def test_the_preparation_does_not_load_torch():
    """python -m scripts.prepare_data starts without torch's seconds of imports."""
    check = ("import sys; import scripts.prepare_data; "
             "print(sorted(m for m in ('torch', 'dataloader') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, cwd=REPO_ROOT, timeout=60)
    assert result.returncode == 0 and result.stdout == "[]\n", result.stderr


def test_out_of_range_flags_are_usage_errors(capsys):
    with pytest.raises(SystemExit) as exit_:
        prepare_data.main(["--source", "tinyshakespeare", "--val_fraction", "1.5"])
    assert exit_.value.code == 2 and "--val_fraction must be in [0, 1), got 1.5" in capsys.readouterr().err


# -----------------------------------------------------------------------------------------------
# JSON lines and parquet: each document is EOT + its tokens, in order, across shard boundaries

DOCS = [f"Doc {i}: " + " ".join(["the quick brown fox", "jumps over", "the lazy dog."][: 1 + i % 3]) * (1 + i % 7)
        for i in range(40)] + ["", "café ✓ 🚀 <|endoftext|> is plain text here"]


def expected_tokens(documents):
    encoder = get_tokenizer()
    return np.array([t for doc in documents for t in [EOT_TOKEN] + encoder.encode_ordinary(doc)], dtype=np.uint16)


def read_first_shard_layout(out_dir, name):
    """The shards of a first_shard folder in index order, after checking their names."""
    paths = sorted(Path(out_dir).glob(f"{name}_*.npy"), key=lambda p: p.stem[-6:])
    assert [p.name for p in paths] == [f"{name}_{'val' if i == 0 else 'train'}_{i:06d}.npy" for i in range(len(paths))]
    return [np.load(p) for p in paths]


def test_jsonl_plain_and_gzip_hold_every_document_once_in_order(tmp_path):
    import gzip
    import json

    (tmp_path / "in").mkdir()
    lines = [json.dumps({"id": i, "text": doc}) for i, doc in enumerate(DOCS)]
    (tmp_path / "in" / "a.jsonl").write_text("\n".join(lines[:25]) + "\n\n")  # a blank line is no document
    with gzip.open(tmp_path / "in" / "b.jsonl.gz", "wt") as f:
        f.write("\n".join(lines[25:]) + "\n")
    out_dir = tmp_path / "out"
    assert prepare_data.main(["--source", "jsonl", "--input", str(tmp_path / "in" / "*.jsonl*"), "--name", "docs",
                              "--out_dir", str(out_dir), "--shard_size", "64", "--num_proc", "2"]) == 0
    shards = read_first_shard_layout(out_dir, "docs")
    assert all(len(shard) == 64 for shard in shards[:-1]) and len(shards) > 5
    assert np.array_equal(np.concatenate(shards), expected_tokens(DOCS))


def test_parquet_rows_are_documents_across_row_groups_and_files(tmp_path):
    pyarrow = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    (tmp_path / "in").mkdir()
    for name, part in [("000_00000.parquet", DOCS[:30]), ("000_00001.parquet", DOCS[30:])]:
        table = pyarrow.table({"id": [str(i) for i in range(len(part))], "body": part, "score": [1.5] * len(part)})
        pq.write_table(table, tmp_path / "in" / name, row_group_size=4)  # many row groups per file
    out_dir = tmp_path / "out"
    assert prepare_data.main(["--source", "parquet", "--input", str(tmp_path / "in" / "*.parquet"), "--name", "edu",
                              "--text_field", "body", "--out_dir", str(out_dir), "--shard_size", "50",
                              "--num_proc", "1"]) == 0
    assert np.array_equal(np.concatenate(read_first_shard_layout(out_dir, "edu")), expected_tokens(DOCS))


def test_tokenizer_batches_equal_encode_ordinary_on_tricky_text():
    """The workers' encode_to_numpy path must give encode_ordinary's tokens, special-token text included."""
    texts = ["", " ", "<|endoftext|>", "a<|endoftext|>b", "\ud800 lone surrogate", "emoji 🚀🚀 and café",
             "\n\n\n  tabs\t\tand spaces   ", "x" * 5000]
    tokenizer_pool.load_tokenizer()
    tokens, lengths = tokenizer_pool.encode_batch([(text, i % 2 == 0) for i, text in enumerate(texts)])
    encoder = get_tokenizer()
    expected = [([EOT_TOKEN] if i % 2 == 0 else []) + encoder.encode_ordinary(text) for i, text in enumerate(texts)]
    assert tokens.dtype == np.uint16 and tokens.tolist() == [t for doc in expected for t in doc]
    assert lengths.tolist() == [len(doc) for doc in expected]


def error_lines(capsys):
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return [line for line in err.splitlines() if line.startswith("error:")]


@pytest.mark.parametrize("content, message", [
    (b'{"text": "fine"}\nnot json at all\n', "bad.jsonl:2 is not JSON (Expecting value: column 1)"),
    (b'{"text": "fine"}\n{"body": "x", "id": 7}\n', "bad.jsonl:2 has no 'text' field (its keys: 'body', 'id'); "
                                                   "name the field that holds the text with --text_field"),
    (b'{"text": "caf\xe9"}\n', "bad.jsonl:1 is not UTF-8"),
    (b'["a", "list"]\n', "bad.jsonl:1 holds a JSON list, not an object with a 'text' field"),
    (b'{"text": 42}\n', "bad.jsonl:1: field 'text' holds a JSON int, expected a string"),
])
def test_bad_json_lines_give_one_error_line_naming_file_and_line(tmp_path, capsys, content, message):
    (tmp_path / "bad.jsonl").write_bytes(content)
    assert run_main(prepare_data.main, ["--source", "jsonl", "--input", str(tmp_path / "bad.jsonl"), "--name", "x",
                      "--out_dir", str(tmp_path / "out"), "--num_proc", "1"]) == 1
    errors = error_lines(capsys)
    assert len(errors) == 1 and message in errors[0], errors


def test_a_jsonl_gz_that_is_not_gzip_says_so(tmp_path, capsys):
    (tmp_path / "docs.jsonl.gz").write_text('{"text": "not compressed"}\n')
    assert run_main(prepare_data.main, ["--source", "jsonl", "--input", str(tmp_path / "docs.jsonl.gz"), "--name", "x",
                      "--out_dir", str(tmp_path / "out")]) == 1
    errors = error_lines(capsys)
    assert len(errors) == 1 and "docs.jsonl.gz is not a readable gzip file" in errors[0]


def test_parquet_without_the_text_column_names_the_columns_and_writes_nothing(tmp_path, capsys):
    pyarrow = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    pq.write_table(pyarrow.table({"content": ["a", "b"], "url": ["u", "v"]}), tmp_path / "x.parquet")
    assert run_main(prepare_data.main, ["--source", "parquet", "--input", str(tmp_path / "x.parquet"), "--name", "x",
                      "--out_dir", str(tmp_path / "out")]) == 1
    errors = error_lines(capsys)
    assert len(errors) == 1 and "x.parquet has no column 'text' (its columns: 'content', 'url')" in errors[0]
    assert not (tmp_path / "out").exists()  # checked before the folder is made


def test_parquet_without_pyarrow_says_pip_install(tmp_path, monkeypatch, capsys):
    (tmp_path / "x.parquet").write_bytes(b"PAR1")
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # makes `import pyarrow...` raise ImportError
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    assert run_main(prepare_data.main, ["--source", "parquet", "--input", str(tmp_path / "x.parquet"), "--name", "x",
                      "--out_dir", str(tmp_path / "out")]) == 1
    errors = error_lines(capsys)
    assert len(errors) == 1 and "pip install pyarrow" in errors[0]
