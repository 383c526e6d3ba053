"""scripts/prepare_data.py: every source writes shards the loader reads, with EOT-led documents."""
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest

from dataloader import EOT_TOKEN, ShardedDataLoader, get_tokenizer

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "prepare_data.py"
sys.path.insert(0, str(SCRIPT.parent))
import prepare_data  # noqa: E402


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


def test_refuses_to_overwrite_shards_unless_asked(tmp_path, tinyshakespeare_path, capsys):
    out_dir = tmp_path / "shakespeare"
    args = ["--source", "tinyshakespeare", "--out_dir", str(out_dir)]
    assert prepare_data.main(args) == 0
    stale = out_dir / "tinyshakespeare_train_000007.npy"
    stale.write_bytes(b"from an older run")
    assert prepare_data.main(args) == 1
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
    monkeypatch.setattr(prepare_data, "TEXT_CHUNK_CHARS", 50_000)  # tiny Shakespeare: ~22 pieces
    assert len(list(prepare_data.split_paragraphs(tinyshakespeare_path.read_text()))) > 10
    assert prepare_data.main(["--source", "text", "--input", str(tinyshakespeare_path), "--name", "shk",
                              "--out_dir", str(tmp_path / "text"), "--num_proc", "2"]) == 0
    assert prepare_data.main(["--source", "tinyshakespeare", "--out_dir", str(tmp_path / "whole")]) == 0
    for split in ("train", "val"):
        assert np.array_equal(read_split(tmp_path / "text", split)[1], read_split(tmp_path / "whole", split)[1])


def test_text_source_that_is_not_utf8_names_the_file(tmp_path, capsys):
    (tmp_path / "good.txt").write_text("fine\n")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9\n".encode("latin-1"))
    assert prepare_data.main(["--source", "text", "--input", str(tmp_path / "*.txt"), "--name", "x",
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
    assert prepare_data.main(["--source", "fineweb-edu", "--out_dir", str(tmp_path / "edu")]) == 1
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
    result = subprocess.run([sys.executable, str(SCRIPT)] + args, capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == rc
    assert message in result.stderr and "Traceback" not in result.stderr


def test_out_of_range_flags_are_usage_errors(capsys):
    with pytest.raises(SystemExit) as exit_:
        prepare_data.main(["--source", "tinyshakespeare", "--val_fraction", "1.5"])
    assert exit_.value.code == 2 and "--val_fraction must be in [0, 1), got 1.5" in capsys.readouterr().err
