"""scripts/plot_metrics.py: reads metrics.jsonl as a resumed run wrote it, writes a PNG, and names the
fix when matplotlib or the log is missing."""
import importlib.util
import json
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent


def load_script():
    spec = importlib.util.spec_from_file_location("plot_metrics", REPO_ROOT / "scripts" / "plot_metrics.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def log_dir(tmp_path):
    """A run of 30 steps with validation and HellaSwag that was killed after step 20 and resumed from 15."""
    records = []
    for run, steps in ((0, range(0, 21)), (1, range(16, 30))):  # the resumed run's losses are 0.5 lower
        for step in steps:
            records.append({"step": step, "loss": 10 - step * 0.2 - 0.5 * run, "lr": 1e-3, "norm": 1.0,
                            "dt_ms": 100.0, "tok_per_sec": 5000.0 + step})
            if step % 10 == 0 or step == 29:
                records.append({"step": step, "val_loss": 10.5 - step * 0.2})
                records.append({"step": step, "hellaswag_acc": 0.25, "hellaswag_acc_norm": 0.25 + step / 1000,
                                "hellaswag_n": 12})
    lines = [json.dumps(r) for r in records]
    lines.insert(30, lines[30][:17])  # a line cut short by kill -9
    (tmp_path / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    return tmp_path


def test_read_metrics_keeps_the_last_record_of_each_step(log_dir):
    series = load_script().read_metrics(log_dir)
    assert list(series["loss"]) == list(range(30))  # resumed steps 16-20 appear once, in order
    assert series["loss"][15] == pytest.approx(7.0)  # logged once
    assert series["loss"][18] == pytest.approx(5.9)  # logged twice: the resumed run's value, not 6.4
    assert list(series["val_loss"]) == [0, 10, 20, 29]
    assert series["hellaswag_acc_norm"][29] == pytest.approx(0.279)


def test_plot_writes_a_png(log_dir, tmp_path, capsys):
    pytest.importorskip("matplotlib", reason="matplotlib is optional (pip install matplotlib) and not installed here")
    out = tmp_path / "plot.png"
    load_script().main([str(log_dir), "--out", str(out)])
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    from matplotlib import colors, image

    pixels = image.imread(out)[..., :3]
    height, width = pixels.shape[:2]
    assert width > 2 * height  # panels side by side
    # Each of the three panels draws the run in the first colour of the cycle: loss, acc_norm, tokens/s.
    line = (abs(pixels - colors.to_rgb("C0")) < 0.05).all(-1)
    pixels_per_panel = [int(line[:, i * width // 3:(i + 1) * width // 3].sum()) for i in range(3)]
    assert min(pixels_per_panel) > 50, pixels_per_panel
    assert capsys.readouterr().out == f"wrote {out}\n"
    load_script().main([str(log_dir)])  # default: next to metrics.jsonl
    assert (log_dir / "metrics.png").is_file()


def test_missing_matplotlib_names_the_install(log_dir, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib` fail, installed or not
    with pytest.raises(SystemExit) as exit_info:
        load_script().main([str(log_dir)])
    assert exit_info.value.code == 1
    assert "pip install matplotlib" in capsys.readouterr().err
    assert not (log_dir / "metrics.png").exists()


def test_a_log_dir_without_metrics_is_one_message(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        load_script().main([str(tmp_path)])
    assert exit_info.value.code == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and str(tmp_path / "metrics.jsonl") in err and "--log_dir" in err
