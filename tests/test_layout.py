"""The shape of the repo as the house style draws it: imports run downhill with no loops, nothing
imports the trainer, torch always loads after the environment it reads is set, and every command
line answers --help with each default stated once."""
import ast
import os
import re
import subprocess
import sys

import pytest

from conftest import REPO_ROOT

# Lower layers never import higher ones; a module may import any module of a lower layer.
LAYERS = [
    ["environment", "cli"],                             # what must come before torch; the command-line conventions
    ["files", "triton_loss", "metrics", "distributed", "run_state"],
    ["device", "shards", "signals", "watchdog"],        # shards: the tokenizer and the token files, without torch
    ["model", "dataloader", "dataprep", "optimizers"],  # dataprep: the preparation, a package (PACKAGES)
    ["converters", "run_config"],                       # other trainers' files; every option -> one frozen config
    ["checkpoint", "config_file"],                      # checkpoint files: layout, names, loading, checks; --config
    ["full_state", "run_folder"],                       # the whole state between the ranks; what a run folder holds
    ["checkpoint_manager", "hellaswag", "gpt2_hf"],
    ["train_gpt2"],                                     # the trainer: CLI and loop; scripts/ sit above it
]
LAYER = {name: i for i, names in enumerate(LAYERS) for name in names}
# A package is one entry of LAYERS to the modules outside it; inside, a module imports only those before it.
PACKAGES = {"dataprep": ["sources", "tokenizer_pool", "shard_writer", "prepare", "__init__"]}
PACKAGE_FILES = [f"{package}/{module}.py" for package, modules in PACKAGES.items() for module in modules]
MODULES = sorted(p.stem for p in REPO_ROOT.glob("*.py"))
SCRIPTS = sorted(p.name for p in (REPO_ROOT / "scripts").glob("*.py"))


def imports(path):
    """(dotted module name, line) of every import in path, top level or inside functions, in file order;
    relative imports as absolute names (from .sources import x in dataprep/prepare.py: dataprep.sources)."""
    package = path.parent.name if path.parent != REPO_ROOT else None
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            found.append((node.module, node.lineno))
        elif isinstance(node, ast.ImportFrom):  # relative: a module of this package
            assert package and node.level == 1, f"{path}:{node.lineno}: a relative import outside a package"
            found += ([(f"{package}.{node.module}", node.lineno)] if node.module
                      else [(f"{package}.{alias.name}", node.lineno) for alias in node.names])
    return sorted(found, key=lambda item: item[1])


def top(name):
    return name.split(".")[0]


def test_every_module_has_a_layer():
    packages = sorted(p.parent.name for p in REPO_ROOT.glob("*/__init__.py")
                      if p.parent.name not in ("scripts", "tests"))
    assert sorted(LAYER) == sorted(MODULES + packages), \
        "a new top-level module or package: give it a layer here and in the README's layout"
    for package, modules in PACKAGES.items():
        assert sorted(p.stem for p in (REPO_ROOT / package).glob("*.py")) == sorted(modules), \
            f"a new module of {package}: give it its place in PACKAGES"


@pytest.mark.parametrize("path", [f"{m}.py" for m in MODULES] + PACKAGE_FILES)
def test_imports_run_downhill(path):
    package, _, stem = path.removesuffix(".py").rpartition("/")
    name = package or stem
    for imported, line in imports(REPO_ROOT / path):
        if package and top(imported) == package:
            inner = imported.partition(".")[2] or "__init__"
            order = PACKAGES[package]
            assert order.index(inner) < order.index(stem), f"{path}:{line} imports {imported}, which is not before it"
        elif top(imported) in LAYER and top(imported) != name:
            assert LAYER[top(imported)] < LAYER[name], f"{path}:{line} imports {imported}, which is not below it"


def test_no_module_imports_the_trainer_or_a_script():
    for path in [f"{m}.py" for m in MODULES] + PACKAGE_FILES:
        imported = {top(module) for module, _ in imports(REPO_ROOT / path)}
        assert "train_gpt2" not in imported or path == "train_gpt2.py"
        assert not imported & ({"scripts"} | {p.removesuffix(".py") for p in SCRIPTS}), path


def module_file(name):
    """The file of one of our modules (dataprep.sources: dataprep/sources.py), or None."""
    target = name.replace(".", "/")
    return next((f for f in (f"{target}.py", f"{target}/__init__.py") if (REPO_ROOT / f).is_file()), None)


def runs_environment(path, seen=()):
    """Whether importing the file runs environment.py: it imports environment, or a module of ours that does."""
    for imported, _ in imports(REPO_ROOT / path):
        if imported == "environment":
            return True
        candidate = module_file(imported)
        if candidate and candidate != path and candidate not in seen and runs_environment(candidate, seen + (path,)):
            return True
    return False


@pytest.mark.parametrize("path", [f"{m}.py" for m in MODULES] + PACKAGE_FILES + [f"scripts/{s}" for s in SCRIPTS])
def test_torch_is_imported_after_the_environment_module(path):
    """environment.py sets variables torch reads once, when it loads: in every file, no import that
    loads torch (torch itself, or a module of ours) may come before it."""
    if path in ("environment.py", "model.py"):  # model.py lifts out alone (below); its importers load environment first
        return
    names = [name for name, _ in imports(REPO_ROOT / path)]
    if "torch" not in [top(name) for name in names]:
        return
    first_torch = [top(name) for name in names].index("torch")
    # environment itself, or a module of ours that imports it (each of which is checked here too)
    sets_it = [i for i, name in enumerate(names)
               if name == "environment" or (module_file(name) and runs_environment(module_file(name)))]
    assert sets_it and sets_it[0] < first_torch, f"{path} imports torch before environment"


def test_model_lifts_out_alone():
    """nanoGPT's model.py imports only torch: users copy it into notebooks and other projects. Ours may also
    use triton_loss.py, and works without it."""
    ours = {top(name) for name, _ in imports(REPO_ROOT / "model.py")}
    assert ours - {"torch", "triton_loss"} <= set(sys.stdlib_module_names), ours


WATCH_TORCH = """
import os, runpy, sys
class Watch:
    def find_spec(self, name, path=None, target=None):
        if name == "torch" and "torch" not in sys.modules:
            sys.stderr.write("torch loads with PYTORCH_ENABLE_MPS_FALLBACK=%s\\n" % os.environ.get("PYTORCH_ENABLE_MPS_FALLBACK"))
            sys.meta_path.remove(self)
        return None
sys.meta_path.insert(0, Watch())
command = sys.argv[1]
sys.argv = [command, "--help"]
if command.endswith(".py"):  # python train_gpt2.py: the file's folder is sys.path[0]
    sys.path.insert(0, os.path.dirname(command))
    runpy.run_path(command, run_name="__main__")
else:  # python -m scripts.sample, from the repository root
    sys.path.insert(0, os.getcwd())
    runpy.run_module(command, run_name="__main__", alter_sys=True)
"""


@pytest.mark.parametrize("cli", ["hellaswag.py", "train_gpt2.py", "scripts.sample"])
def test_a_command_line_sets_the_environment_before_torch_loads(cli):
    """What the import order above guarantees, seen from a fresh interpreter: hellaswag.py used to load
    torch first, too late for PYTORCH_ENABLE_MPS_FALLBACK on a Mac."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTORCH_")}
    command = str(REPO_ROOT / cli) if cli.endswith(".py") else cli
    result = subprocess.run([sys.executable, "-c", WATCH_TORCH, command], capture_output=True, text=True,
                            timeout=120, env=env, cwd=REPO_ROOT)
    assert result.returncode == 0 and result.stdout.startswith("usage:"), result.stderr
    loaded = [line for line in result.stderr.splitlines() if line.startswith("torch loads")]
    assert loaded == ["torch loads with PYTORCH_ENABLE_MPS_FALLBACK=1"], result.stderr


SCRIPT_CLIS = [s.removesuffix(".py") for s in SCRIPTS
               if not s.startswith("_") and "__main__" in (REPO_ROOT / "scripts" / s).read_text()]
CLIS = ["train_gpt2", "checkpoint", "hellaswag", "gpt2_hf", "device"] + [f"scripts.{s}" for s in SCRIPT_CLIS]


@pytest.mark.parametrize("cli", CLIS)
def test_every_command_line_answers_help_with_each_default_stated_once(cli, capsys):
    """In this process (the fresh-interpreter check is above): the module's main(["--help"])."""
    import importlib

    module = importlib.import_module("scripts.checkpoint_tool" if cli == "checkpoint" else cli)  # it forwards there
    entry = getattr(module, "main", None) or module.run
    with pytest.raises(SystemExit) as exit_info:
        entry(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage:") and "(default: None)" not in out, out[:300]


def test_no_script_edits_sys_path():
    edit = re.compile(r"sys\.path\.(insert|append|extend|remove)\(|sys\.path\s*(\+)?=")
    for name in SCRIPTS:
        assert not edit.search((REPO_ROOT / "scripts" / name).read_text()), name


@pytest.mark.parametrize("name", SCRIPT_CLIS)
def test_a_script_started_as_a_path_names_the_module_command_and_exits_2(name, tmp_path):
    """Before any import of ours (they would fail there): one line with the user's arguments, exit status 2."""
    result = subprocess.run([sys.executable, str(REPO_ROOT / "scripts" / f"{name}.py"), "--out", "my file", "-x"],
                            capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr == (f"error: {name}.py is part of the scripts package; run it from the repository root "
                             f"({REPO_ROOT}) as: python -m scripts.{name} --out 'my file' -x\n")


def test_checkpoint_py_still_runs_the_tool_from_any_folder(tmp_path):
    result = subprocess.run([sys.executable, str(REPO_ROOT / "checkpoint.py"), "list", str(tmp_path / "nothing")],
                            capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert result.returncode == 2 and result.stderr.startswith("error: ") and "Traceback" not in result.stderr


def test_the_readme_layer_table_is_this_layout():
    import re

    rows = re.findall(r"^\| (\d+) \| `([\w/]+?)(?:\.py)?/?` \|", (REPO_ROOT / "README.md").read_text(), flags=re.M)
    assert {name: int(layer) for layer, name in rows} == {name: layer for name, layer in LAYER.items()}
