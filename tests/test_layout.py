"""The shape of the repo as the house style draws it: imports run downhill with no loops, nothing
imports the trainer, torch always loads after the environment it reads is set, and every command
line answers --help with each default stated once."""
import ast
import os
import subprocess
import sys

import pytest

from conftest import REPO_ROOT

# Lower layers never import higher ones; a module may import any module of a lower layer.
LAYERS = [
    ["environment", "cli"],                             # what must come before torch; the command-line conventions
    ["files", "triton_loss", "metrics", "distributed"],
    ["device", "dataloader", "signals", "watchdog"],
    ["model"],
    ["converters"],
    ["checkpoint"],                                     # checkpoint files
    ["checkpoint_manager", "hellaswag", "gpt2_hf"],
    ["run_config"],                                     # flags, presets and automatic choices -> one frozen config
    ["train_gpt2"],                                     # the trainer: CLI and loop; scripts/ sit above it
]
LAYER = {name: i for i, names in enumerate(LAYERS) for name in names}
MODULES = sorted(p.stem for p in REPO_ROOT.glob("*.py"))
SCRIPTS = sorted(p.name for p in (REPO_ROOT / "scripts").glob("*.py"))


def imports(path):
    """(module name, line) of every import of this repo's modules in path, top level or inside functions,
    in file order."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(alias.name.split(".")[0], node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.module.split(".")[0], node.lineno))
    return sorted(found, key=lambda item: item[1])


def test_every_module_has_a_layer():
    assert sorted(LAYER) == MODULES, "a new top-level module: give it a layer here and in the README's layout"


@pytest.mark.parametrize("name", MODULES)
def test_imports_run_downhill(name):
    for imported, line in imports(REPO_ROOT / f"{name}.py"):
        if imported in LAYER and imported != name:
            assert LAYER[imported] < LAYER[name], f"{name}.py:{line} imports {imported}, which is not below it"


def test_no_module_imports_the_trainer_or_a_script():
    for name in MODULES:
        imported = {module for module, _ in imports(REPO_ROOT / f"{name}.py")}
        assert "train_gpt2" not in imported or name == "train_gpt2"
        assert not imported & {p.removesuffix(".py") for p in SCRIPTS}, name


@pytest.mark.parametrize("path", [f"{m}.py" for m in MODULES] + [f"scripts/{s}" for s in SCRIPTS])
def test_torch_is_imported_after_the_environment_module(path):
    """environment.py sets variables torch reads once, when it loads: in every file, no import that
    loads torch (torch itself, or a module of ours) may come before it."""
    if path == "environment.py":
        return
    names = [name for name, _ in imports(REPO_ROOT / path)]
    if "torch" not in names:
        return
    # environment itself, or a module of ours, each of which imports it before anything else (checked here too)
    sets_it = [i for i, name in enumerate(names) if name in LAYER and name != "cli"]
    assert sets_it and sets_it[0] < names.index("torch"), f"{path} imports torch before environment"


WATCH_TORCH = """
import os, runpy, sys
class Watch:
    def find_spec(self, name, path=None, target=None):
        if name == "torch" and "torch" not in sys.modules:
            sys.stderr.write("torch loads with PYTORCH_ENABLE_MPS_FALLBACK=%s\\n" % os.environ.get("PYTORCH_ENABLE_MPS_FALLBACK"))
            sys.meta_path.remove(self)
        return None
sys.meta_path.insert(0, Watch())
script = sys.argv[1]
sys.argv = [script, "--help"]
sys.path.insert(0, os.path.dirname(script))
runpy.run_path(script, run_name="__main__")
"""


@pytest.mark.parametrize("cli", ["hellaswag.py", "train_gpt2.py", "scripts/sample.py"])
def test_a_command_line_sets_the_environment_before_torch_loads(cli):
    """What the import order above guarantees, seen from a fresh interpreter: hellaswag.py used to load
    torch first, too late for PYTORCH_ENABLE_MPS_FALLBACK on a Mac."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTORCH_")}
    result = subprocess.run([sys.executable, "-c", WATCH_TORCH, str(REPO_ROOT / cli)], capture_output=True, text=True,
                            timeout=120, env=env, cwd=REPO_ROOT)
    assert result.returncode == 0 and result.stdout.startswith("usage:"), result.stderr
    loaded = [line for line in result.stderr.splitlines() if line.startswith("torch loads")]
    assert loaded == ["torch loads with PYTORCH_ENABLE_MPS_FALLBACK=1"], result.stderr


CLIS = ["train_gpt2.py", "checkpoint.py", "hellaswag.py", "gpt2_hf.py", "device.py"] + [
    f"scripts/{s}" for s in SCRIPTS if "__main__" in (REPO_ROOT / "scripts" / s).read_text()]


@pytest.mark.parametrize("cli", CLIS)
def test_every_command_line_answers_help_with_each_default_stated_once(cli, capsys):
    """In this process (the fresh-interpreter check is above): the module's main(["--help"])."""
    import importlib.util

    path = REPO_ROOT / cli
    if cli == "checkpoint.py":  # forwards to the tool
        path = REPO_ROOT / "scripts" / "checkpoint_tool.py"
    sys.path.insert(0, str(path.parent))
    try:
        spec = importlib.util.spec_from_file_location(f"cli_{path.stem}", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        entry = getattr(module, "main", None) or module.run
        with pytest.raises(SystemExit) as exit_info:
            entry(["--help"])
    finally:
        sys.path.remove(str(path.parent))
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage:") and "(default: None)" not in out, out[:300]
