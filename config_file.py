"""Config files: any trainer option by its name, in YAML, TOML or JSON, below the command line and above
everything else (a resumed checkpoint's settings, the recipe or quickstart, the device preset).

    python train_gpt2.py --config configs/gpt2-124m.yaml --max_steps 100     # the flag wins
    python train_gpt2.py configs/gpt2-124m.yaml --compile=False              # nanoGPT's habit: a positional file
    python train_gpt2.py --config gpt2-124m                                  # a file of configs/, by its name
    python checkpoint.py config log/model_05000.pt > run.yaml                # the settings that reproduce a run

    load(spec, parser) -> (path, {option: value})    read, with each key and value checked as its flag would be
    dump(values, fmt) -> text                        what `checkpoint.py config` writes

Keys are option names with underscores or hyphens (max_steps, max-steps); an unknown key is an error
naming the nearest option. YAML needs PyYAML (optional: pip install pyyaml); TOML (Python 3.11's
tomllib) and JSON need nothing.
"""
import difflib
import json
from pathlib import Path

import cli
from run_config import BY_NAME

CONFIG_DIR = Path(__file__).resolve().parent / "configs"
SUFFIXES = (".yaml", ".yml", ".toml", ".json")


class ConfigFileError(cli.UserError):
    """A config file that cannot be read or holds what no option takes; the message names the key and the fix."""


def find(spec):
    """The file a --config names: a path, or the name of a file in configs/ (gpt2-124m)."""
    path = Path(spec)
    if path.is_file():
        return path
    for suffix in ("",) + SUFFIXES:
        named = CONFIG_DIR / f"{spec}{suffix}"
        if named.is_file() and not path.suffix:
            return named
    ready = ", ".join(sorted(p.stem for p in CONFIG_DIR.glob("*") if p.suffix in SUFFIXES)) or "none"
    raise ConfigFileError(f"--config {spec}: no such file, nor a config of configs/ (those are: {ready})")


def read(path):
    """The mapping a config file holds."""
    text = path.read_text()
    if path.suffix not in SUFFIXES:
        raise ConfigFileError(f"--config {path}: a config file ends in {', '.join(SUFFIXES)}")
    parse = _yaml().safe_load if path.suffix in (".yaml", ".yml") else json.loads  # a missing PyYAML: its own error
    try:
        if path.suffix == ".toml":
            import tomllib  # Python 3.11 on; an ImportError before it is reported like a syntax error

            parse = tomllib.loads
        data = parse(text)
    except Exception as exc:  # each parser's own error class: a syntax error, in one line
        raise ConfigFileError(f"--config {path} is not valid {path.suffix[1:].upper()}: {str(exc).splitlines()[0]}")
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigFileError(f"--config {path} holds a {type(data).__name__}, not option: value pairs")
    return data


def _yaml():
    try:
        import yaml
    except ImportError:
        raise ConfigFileError("YAML config files need PyYAML, which is not installed: pip install pyyaml (or write "
                              "the file as TOML or JSON)") from None
    return yaml


def load(spec, parser):
    """(path, {option: value}) of the config file spec names, each value checked as its flag would check it."""
    path = find(spec)
    actions = {action.dest: action for action in parser._actions}
    values = {}
    for key, value in read(path).items():
        name = str(key).replace("-", "_")
        if name not in BY_NAME:
            near = difflib.get_close_matches(name, list(BY_NAME), n=1)
            raise ConfigFileError(f"--config {path}: {key} is not an option of the trainer"
                                  + (f"; did you mean {near[0]}?" if near else "; python train_gpt2.py --help lists them"))
        values[name] = _checked(actions[name], value, name, path)
    return path, values


def _checked(action, value, name, path):
    """value as the flag would have parsed it: strings through the flag's own type, numbers and booleans as they are."""
    kind = BY_NAME[name].metadata["type"]
    try:
        if value is None:
            return None
        if isinstance(value, str) and action.type is not None:
            value = action.type(value)
        elif kind is bool and not isinstance(value, bool):
            raise ValueError(f"{value!r} is neither true nor false")
        elif kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        elif kind is int and not (isinstance(value, int) and not isinstance(value, bool)):
            raise ValueError(f"{value!r} is not a whole number")
    except Exception as exc:  # ValueError, TypeError, or argparse.ArgumentTypeError from the flag's type
        raise ConfigFileError(f"--config {path}: {name}: {exc}") from None
    if action.choices is not None and value not in action.choices:
        raise ConfigFileError(f"--config {path}: {name} {value!r} is not one of {', '.join(map(str, action.choices))}")
    return value


def dump(values, fmt="yaml"):
    """The text of a config file holding values (plain types), as load() reads it back."""
    if fmt == "json":
        return json.dumps(values, indent=2) + "\n"
    if fmt == "toml":
        # TOML's strings, numbers and booleans are written as JSON writes them; it has no null: a None is left out
        return "".join(f"{key} = {json.dumps(value)}\n" for key, value in values.items() if value is not None)
    return _yaml().safe_dump(values, sort_keys=False)
