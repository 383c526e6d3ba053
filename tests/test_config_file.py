"""Config files (YAML, TOML, JSON, by path or by name in configs/), the habits users bring (--flag=False), W&B's own
environment variables, and `checkpoint.py config`, whose file reproduces a run."""
import json

import pytest

import metrics
import run_config
import train_gpt2
from conftest import REPO_ROOT, read_metrics, run_main
from test_resume import train

pytest.importorskip("yaml", reason="YAML config files need PyYAML (optional; CI installs it)")


def source(config, name):
    return dict(config.sources)[name]


@pytest.mark.parametrize("suffix, text", [
    (".yaml", "max_steps: 7\nmax-lr: 2.0e-3\nshuffle: true\ncompile: none\n"),
    (".toml", 'max_steps = 7\nmax-lr = 2e-3\nshuffle = true\ncompile = "none"\n'),
    (".json", '{"max_steps": 7, "max-lr": 0.002, "shuffle": true, "compile": "none"}'),
])
def test_a_config_file_sets_options_below_the_command_line(tmp_path, suffix, text):
    path = tmp_path / f"run{suffix}"
    path.write_text(text)
    config = run_config.resolve(train_gpt2.parse_args(["--config", str(path), "--max_steps", "9"]), "cpu")
    assert (config.max_steps, source(config, "max_steps")) == (9, "flag")  # the command line wins
    assert (config.max_lr, source(config, "max_lr")) == (2e-3, f"config:{path}")
    assert config.shuffle is True and config.compile == "none"
    positional = run_config.resolve(train_gpt2.parse_args([str(path), "--compile=True"]), "cpu")  # nanoGPT's way
    assert positional.max_steps == 7 and positional.compile == "default"


def test_config_file_mistakes_are_one_line_naming_the_fix(tmp_path, capsys):
    cases = {"max_step: 5\n": "max_step is not an option of the trainer; did you mean max_steps?",
             "max_steps: many\n": "max_steps: invalid literal for int() with base 10: 'many'",
             "fsdp: maybe\n": "fsdp: 'maybe' is neither true nor false",
             "save_optimizer: some\n": "save_optimizer 'some' is not one of all, latest",
             "max_steps: [5\n": "is not valid YAML"}
    for text, message in cases.items():
        (tmp_path / "bad.yaml").write_text(text)
        assert run_main(train_gpt2.main, ["--config", tmp_path / "bad.yaml", "--device", "cpu"]) == 1
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err and "Traceback" not in err, (text, err)
    assert run_main(train_gpt2.main, ["--config", "no-such-config"]) == 1
    assert "gpt2-124m" in capsys.readouterr().err  # names the ready ones


@pytest.mark.parametrize("name", sorted(p.stem for p in (REPO_ROOT / "configs").glob("*.yaml")))
def test_every_ready_config_resolves(name):
    args = train_gpt2.parse_args(["--config", name])
    device_type = name.split("-")[1] if name.startswith("quickstart-") else "cpu" if "124m" in name else "cuda"
    config = run_config.resolve(args, device_type, world_size=4 if "fsdp" in name else 1,
                                found={"micro_batch_size": 4, "dtype": "bf16"} if "fsdp" in name else None)
    assert source(config, "max_steps").startswith("config:")
    if name.startswith("quickstart-"):  # the same run as no flags at all on that device
        bare = run_config.resolve(train_gpt2.parse_args([]), name.split("-")[1])
        assert {k: getattr(config, k) for k in run_config.RUNS[f"quickstart:{name.split('-')[1]}"]} == \
            {k: getattr(bare, k) for k in run_config.RUNS[f"quickstart:{name.split('-')[1]}"]}


def test_checkpoint_config_writes_a_file_that_reproduces_the_run(random_data, tmp_path, capsys):
    assert train(random_data, tmp_path / "a", "--max_steps", 4, "--seed", 3, "--max_lr", 2e-3) == 0
    capsys.readouterr()
    assert run_main(_tool, ["config", tmp_path / "a" / "model_00003.pt"]) == 0
    (tmp_path / "run.yaml").write_text(capsys.readouterr().out)
    assert run_main(train_gpt2.main, ["--config", tmp_path / "run.yaml", "--log_dir", tmp_path / "b"]) == 0
    losses = [{r["step"]: r["loss"] for r in read_metrics(tmp_path / d) if "loss" in r} for d in ("a", "b")]
    assert losses[0] == losses[1] and len(losses[0]) == 4


def _tool(argv):
    from conftest import load_script

    return load_script("checkpoint_tool.py").main(argv)


def test_a_resume_with_a_config_of_another_shape_is_refused(random_data, tmp_path, capsys):
    assert train(random_data, tmp_path / "log", "--max_steps", 2) == 0
    (tmp_path / "wide.json").write_text(json.dumps({"n_embd": 128}))
    capsys.readouterr()
    assert run_main(train_gpt2.main, ["--log_dir", tmp_path / "log", "--auto_resume", "--config", tmp_path / "wide.json"]) == 1
    assert "--n_embd 128 (the checkpoint has 64)" in capsys.readouterr().err


def test_wandbs_own_environment_variables_win(tmp_path, monkeypatch):
    calls = []

    class FakeWandb:
        Settings = dict

        @staticmethod
        def init(**kwargs):
            calls.append(kwargs)
            return type("Run", (), {"id": kwargs["id"], "log": lambda self, *a, **k: None, "finish": lambda self: None})()

    monkeypatch.setattr(metrics, "import_for", lambda flag, module: FakeWandb)
    for key, value in (("WANDB_PROJECT", "theirs"), ("WANDB_NAME", "their-run"), ("WANDB_RUN_ID", "abc123xy"),
                       ("WANDB_DIR", str(tmp_path / "wandb-files"))):
        monkeypatch.setenv(key, value)
    tracked = metrics.TrackedRun()
    m = metrics.Metrics(tmp_path / "log", wandb=metrics.WandbRun("gpt2-train", "log", {}, tracked))
    m.close()
    assert calls[0]["project"] == "theirs" and calls[0]["name"] == "their-run" and calls[0]["id"] == "abc123xy"
    assert calls[0]["dir"] == str(tmp_path / "wandb-files") and tracked.wandb_run_id == "abc123xy"
