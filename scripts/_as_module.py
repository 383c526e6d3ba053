"""What a script of this package does when started as a path (python scripts/sample.py ...): there, its
imports of the repository's modules would fail, so it names the command that works and exits 2.
Each script calls it first thing, before any import of ours:

    if __name__ == "__main__" and not __package__:  # started as a path: say the command that works
        from _as_module import exit_with_module_command  # scripts/ is sys.path[0] here
        exit_with_module_command(__file__)

It imports nothing of the repository: on the path scripts/ is all that can be imported.
"""
import os
import shlex
import sys
from pathlib import Path


def exit_with_module_command(script_file):
    """Name the command to use instead, python -m scripts.NAME ARGS (torchrun ... -m under torchrun), and exit 2."""
    module_and_args = [f"scripts.{Path(script_file).stem}", *sys.argv[1:]]
    command = shlex.join(["python", "-m", *module_and_args])
    if "TORCHELASTIC_RUN_ID" in os.environ:  # torchrun started it: torchrun takes -m too
        command = f"torchrun [your torchrun flags] -m {shlex.join(module_and_args)}"
    if os.environ.get("LOCAL_RANK", "0") == "0":  # one line, not one per torchrun rank
        print(f"error: {Path(script_file).name} is part of the scripts package; run it from the repository root "
              f"({Path(script_file).resolve().parent.parent}) as: {command}", file=sys.stderr)
    sys.exit(2)
