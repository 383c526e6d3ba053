"""scripts.bench_optimizers and scripts.docs_corpus: the optimizer comparison's table and the corpus it reads."""
import gzip
import json

from conftest import load_script, run_main

bench = load_script("bench_optimizers.py")
corpus = load_script("docs_corpus.py")

RUN = ["--model", "d2", "--n_embd", "64", "--n_head", "2", "--block_size", "32", "--seq_len", "16",
       "--micro_batch_size", "2", "--total_batch_size", "64", "--max_steps", "4", "--warmup_steps", "1",
       "--eval_interval", "2", "--eval_steps", "1", "--max_new_tokens", "2", "--num_samples", "1", "--num_threads", "1",
       "--device", "cpu"]


def test_the_tokens_to_a_loss_are_read_off_the_line_between_two_evaluations():
    curve = [(100, 1.0, 5.0), (200, 2.0, 4.0), (300, 3.0, 3.0)]  # (tokens, seconds, val loss)
    assert bench.reach(curve, 3.5) == (250, 2.5)
    assert bench.reach(curve, 5.5) == (100, 1.0)  # already there at the first evaluation
    assert bench.reach(curve, 2.9) is None


def test_the_bench_trains_each_optimizer_prints_the_table_and_reuses_finished_runs(tiny_data, tmp_path, capsys):
    args = ["--out", tmp_path, "--muon_lrs", "0.02", "--", "--data_root", tiny_data, *RUN]
    assert run_main(bench.main, args) == 0
    out = capsys.readouterr().out
    assert "adamw: " in out and "--optimizer muon --muon_lr 0.02 --log_dir" in out
    rows = {line.split(" | ")[0].strip("| "): line for line in out.splitlines() if line.startswith("| ")}
    assert "| 0.02 (AdamW 0.0006) |" in rows["muon_lr0.02"]
    assert "256 (100%)" in rows["adamw"]  # the AdamW run reaches its own final val loss at its last token
    assert {"64", "192", "256"} <= {line.split(" | ")[0].strip("| ").replace(",", "") for line in out.splitlines()}
    assert run_main(bench.main, args) == 0
    assert out.count("finished before") == 0 and capsys.readouterr().out.count("finished before with this command") == 2
    changed = ["--out", tmp_path, "--muon_lrs", "0.02", "--", "--data_root", tiny_data, *RUN, "--seed", "1"]
    assert run_main(bench.main, changed) == 1
    assert "holds a finished run of another command" in capsys.readouterr().err


def test_the_corpus_keeps_an_mdbooks_chapters_without_its_sidebar(tmp_path, monkeypatch):
    page = ("<html><nav class='sidebar'><ol><li>1. Getting Started</li></ol></nav><main>"
            "<h1>Getting Started</h1><p>Let us start " + "with Rust. " * 30 + "</p><script>var x;</script>"
            "<h1>Ownership</h1><p>Each value has " + "an owner. " * 30 + "</p></main></html>")
    book = tmp_path / "book"
    book.mkdir()
    (book / "print.html").write_text(page)
    monkeypatch.setattr(corpus, "RUST_BOOKS", str(tmp_path / "*" / "print.html"))
    out = tmp_path / "corpus.jsonl.gz"
    assert run_main(corpus.main, ["--out", out, "--sources", "rust books"]) == 0
    documents = [json.loads(line) for line in gzip.open(out, "rt")]
    assert sorted(d["text"].split("\n")[0] for d in documents) == ["Getting Started", "Ownership"]
    assert all(d["source"] == "rust:book" for d in documents)
    assert not any("1. Getting Started" in d["text"] or "var x" in d["text"] for d in documents)
