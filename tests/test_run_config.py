"""The run configuration: every option declared once (flag, help, default, check), and resolve, the pure step
from a command line (and a resumed checkpoint's settings) to one frozen RunConfig."""
import builtins
import os

import pytest
import torch

import device
import run_config
from run_config import RUNS, ConfigError, resolve
from train_gpt2 import parse_args


def config_of(*argv, device_type="cpu", **kwargs):
    return resolve(parse_args([str(a) for a in argv]), device_type, **kwargs)


def source(config, name):
    return dict(config.sources)[name]


def test_flags_beat_the_run_table_which_beats_the_preset_and_each_value_says_where_it_came_from():
    config = config_of("--data_root", "x", "--micro_batch_size", 3, "--total_batch_size", 3 * 1024)
    assert (config.micro_batch_size, source(config, "micro_batch_size")) == (3, "flag")
    assert (config.max_lr, source(config, "max_lr")) == (6e-4, "recipe")
    assert (config.dtype, source(config, "dtype")) == ("fp32", "preset:cpu")
    quick = config_of()
    assert (quick.model, source(quick, "model")) == ("d4", "quickstart:cpu")
    assert quick.data_root == run_config.DEFAULT_DATA_ROOT and quick.grad_accum_steps == 1
    preset = config_of("--data_root", "x", "--preset", "cuda", "--compile", "none")
    assert (preset.micro_batch_size, source(preset, "micro_batch_size")) == ("auto", "preset:cuda")
    assert (preset.pin_memory, preset.compile, source(preset, "compile")) == (True, "none", "flag")
    assert preset.grad_accum_steps is None  # the probe has not run: the setup passes its answer in found


@pytest.mark.parametrize("preset", sorted(device.PRESETS))
def test_no_preset_touches_the_learning_rate(preset):
    assert not {"max_lr", "min_lr", "warmup_steps", "weight_decay", "total_batch_size"} & set(device.PRESETS[preset])
    assert config_of("--data_root", "x", "--preset", preset, "--micro_batch_size", 8).max_lr == 6e-4


def test_a_table_min_lr_above_a_given_max_lr_becomes_a_tenth_of_it():
    config = config_of("--max_lr", 1e-4)  # the CPU quickstart's min_lr is 2e-4
    assert config.min_lr == pytest.approx(1e-5) and source(config, "min_lr") == "max_lr/10"
    with pytest.raises(ConfigError, match="--min_lr 0.001 is above --max_lr 0.0001"):
        config_of("--max_lr", 1e-4, "--min_lr", 1e-3)


def test_help_states_each_default_from_the_tables_so_it_cannot_drift(capsys):
    with pytest.raises(SystemExit):
        parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    for name, table in RUNS.items():
        for key, value in table.items():
            where = f"{value} with --data_root (the recipe)" if name == "recipe" else f"{name.split(':')[1]} {value}"
            assert where in text, (key, where)
    for name, table in device.PRESETS.items():
        for value in table.values():
            assert f"{name} {value}" in text


def test_resolve_is_pure(monkeypatch):
    """No file is opened or looked at, no collective runs, no torch setting changes: it is tested without a device."""
    def refuse(*args, **kwargs):
        raise AssertionError("resolve did I/O or ran a collective")

    args = parse_args(["--data_root", "/nonexistent", "--deterministic", "--num_threads", "1", "--init_from", "x.pt",
                       "--log_dir", "/nonexistent/log"])
    before = (torch.get_num_threads(), torch.are_deterministic_algorithms_enabled())
    for target, name in ((builtins, "open"), (os, "stat"), (os, "listdir"), (torch.distributed, "broadcast_object_list")):
        monkeypatch.setattr(target, name, refuse)
    config = resolve(args, "cuda", 4)
    monkeypatch.undo()
    assert config.deterministic and config.world_size == 4 and config.init_from == "x.pt"
    assert (torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()) == before


@pytest.mark.parametrize("argv, message", [
    (["--max_steps", 0], "--max_steps 0 cannot work: use at least 1"),
    (["--grad_clip", "nan"], "--grad_clip nan cannot work"),
    (["--init_from", "gpt2", "--n_layer", 4], "--init_from takes the model shape from the weights"),
    (["--init_from_optimizer"], "--init_from_optimizer needs --init_from FILE"),
    (["--n_embd", 100, "--n_head", 3], "--n_embd 100 is not divisible by --n_head 3"),
    (["--seq_len", 2048], "--seq_len 2048 is longer than the model's block size 1024"),
    (["--total_batch_size", 1000], "is not a multiple of micro_batch_size \\* seq_len \\* world_size"),
    (["--start_over", "--auto_resume"], "--start_over begins a new run"),
])
def test_what_cannot_work_is_one_message_naming_the_flag(argv, message):
    with pytest.raises(ConfigError, match=message):
        config_of(*argv)


def test_booleans_take_the_spellings_people_type_and_abbreviations_are_typos(capsys):
    args = parse_args(["--tensorboard=False", "--deterministic", "yes", "--fsdp=1", "--compile=False", "--no_pin_memory"])
    assert (args.tensorboard, args.deterministic, args.fsdp, args.compile, args.pin_memory) == (False, True, True,
                                                                                                "none", False)
    assert parse_args(["--compile=True"]).compile == "default" and parse_args(["--compile"]).compile == "default"
    assert parse_args(["--compile", "max-autotune"]).compile == "max-autotune"
    assert parse_args(["--reset-optimizer"]).reset_optimizer and parse_args(["--no_load_optimizer"]).reset_optimizer
    assert parse_args(["--checkpoint_path", "a.pt"]).resume_from_checkpoint == "a.pt"
    for wrong in (["--tensorboard=maybe"], ["--max_step", "5"], ["--micro_batch_size", "0"]):
        with pytest.raises(SystemExit) as exit_info:
            parse_args(wrong)
        assert exit_info.value.code == 2
    assert parse_args(["--micro_batch_size", "auto"]).micro_batch_size == "auto"


def test_a_micro_batch_a_table_or_checkpoint_chose_is_fitted_to_the_ranks_and_a_given_one_is_not():
    quick = config_of(world_size=2)  # `torchrun --nproc_per_node=2 train_gpt2.py`: the quickstart's 8 x 64 x 2 > 512
    assert (quick.micro_batch_size, source(quick, "micro_batch_size")) == (4, "fitted (quickstart:cpu)")
    assert quick.total_batch_size == 512 and quick.grad_accum_steps == 1
    assert quick.notes == ("micro_batch_size 8 (quickstart:cpu) does not fit 512 tokens a step over 2 ranks: "
                           "4 sequences a rank",)
    assert config_of().micro_batch_size == 8 and config_of().notes == ()  # one rank: 512 = 8 x 64, as it was
    with pytest.raises(ConfigError, match="8 \\* 64 \\* 3 = 1536"):  # no whole sequences for 3 ranks: the fix named
        config_of(world_size=3)
    with pytest.raises(ConfigError, match="--total_batch_size 512 is not a multiple of micro_batch_size"):
        config_of("--micro_batch_size", 8, world_size=2)  # asked for: the user's choice, the message names the fix
    run = config_of("--data_root", "d", "--model", "d2", "--seq_len", 32, "--micro_batch_size", 8,
                    "--total_batch_size", 256).to_dict()
    wider = config_of("--auto_resume", stored=run, world_size=2)  # the same run on two ranks keeps its batch
    assert (wider.micro_batch_size, wider.total_batch_size, source(wider, "micro_batch_size")) == (
        4, 256, "fitted (checkpoint)")


def test_before_a_resumes_checkpoint_is_read_its_batch_is_not_judged_by_the_tables():
    run = config_of("--data_root", "d", "--model", "d2", "--seq_len", 32, "--micro_batch_size", 8,
                    "--total_batch_size", 1024).to_dict()
    argv = ("--auto_resume", "--micro_batch_size", 8)  # with the quickstart's 512 x 64 over 2 ranks: no fit
    with pytest.raises(ConfigError, match="is not a multiple of"):
        config_of(*argv, world_size=2)
    assert config_of(*argv, world_size=2, before_resume=True).auto_resume  # the setup's call before the read
    assert config_of(*argv, world_size=2, stored=run).grad_accum_steps == 2  # 1024 / (8 x 32 x 2): the run's fits
    with pytest.raises(ConfigError, match="is not a multiple of"):  # a fresh run is judged at once
        config_of("--micro_batch_size", 8, world_size=2, before_resume=True)
    short = config_of("--data_root", "d", "--model", "d2", "--block_size", 32, "--seq_len", 16,
                      "--micro_batch_size", 2, "--total_batch_size", 64).to_dict()
    repeated = ("--auto_resume", "--block_size", 32)  # the run's own flag again: the quickstart's seq_len 64 is no run's
    assert config_of(*repeated, before_resume=True).auto_resume
    assert config_of(*repeated, stored=short).seq_len == 16
    with pytest.raises(ConfigError, match="--seq_len 64 is longer than the model's block size 32"):
        config_of("--block_size", 32, before_resume=True)


def test_a_resume_keeps_the_runs_settings_and_refuses_another_shape():
    run = config_of("--data_root", "d", "--model", "d2", "--n_embd", 64, "--seq_len", 32, "--micro_batch_size", 4,
                    "--total_batch_size", 256, "--max_lr", 3e-3, "--seed", 7, "--compile", "none")
    stored = run.to_dict()
    bare = config_of("--auto_resume", "--log_dir", "log", stored=stored)
    for name in ("data_root", "seq_len", "total_batch_size", "max_lr", "seed", "micro_batch_size", "max_steps"):
        assert getattr(bare, name) == getattr(run, name) and source(bare, name) == "checkpoint", name
    assert bare.model_config == run.model_config and bare.auto_resume and source(bare, "auto_resume") == "flag"
    changed = config_of("--auto_resume", "--max_steps", 50, "--max_lr", 1e-3, stored=stored)
    assert (changed.max_steps, source(changed, "max_steps"), changed.max_lr) == (50, "flag", 1e-3)
    elsewhere = config_of("--auto_resume", stored=stored, device_type="cuda")  # device settings: chosen afresh
    assert (elsewhere.micro_batch_size, source(elsewhere, "micro_batch_size")) == ("auto", "preset:cuda")
    assert elsewhere.seq_len == 32 and elsewhere.max_lr == 3e-3
    for argv, what in ((["--n_embd", 128], "--n_embd 128 (the checkpoint has 64)"),
                       (["--model", "d4"], "--n_layer 4 (the checkpoint has 2)"),
                       (["--seq_len", 64], "--seq_len 64 (the checkpoint has 32)")):
        with pytest.raises(ConfigError, match=f"with {what.replace('(', '.').replace(')', '.')}.*would train another run"):
            config_of("--auto_resume", *argv, stored=stored)
    assert config_of("--auto_resume", "--model", "d2", "--n_embd", 64, stored=stored).n_embd == 64  # the same: fine
