"""What every command line of this project shares.

    UserError            the one base class of errors shown to users: one "error: ..." line, exit 1
    UsageError           a UserError about how a command was called: exit 2
    ArgumentParser       argparse with each flag's hyphen and underscore spellings (--max-steps = --max_steps),
                         and help that states a default once, where there is one
    positive_int         an argparse type: a whole number of at least 1
    boolean              an argparse type: True/False, 1/0, yes/no, on/off (--compile=False, --wandb=1)
    main(run, argv)      calls run(argv); a UserError becomes its one line and exit status
    log(line)            one line for the user, from rank 0 only (every module's output goes through it)
    with log_to(sys.stderr): ...   for commands whose stdout is their result (JSON, samples)

Every module's own error class (DataError, DeviceError, CheckpointError, ...) derives from
UserError, so a command's main() catches one class, and the message always names the fix.
"""
import argparse
import contextlib
import os
import sys


class UserError(Exception):
    """Something the user can fix: a flag, a file, a missing package, a full disk. The message
    says what went wrong, the path or value involved, and the fix."""

    exit_status = 1


class UsageError(UserError):
    """The command was called wrongly (a missing path, a bad argument)."""

    exit_status = 2


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Appends "(default: X)" to a flag's help where it has a default that the help does not state."""

    def _get_help_string(self, action):
        text = action.help or ""
        default = action.default
        if default is None or default is argparse.SUPPRESS or isinstance(default, bool) or "default" in text:
            return text
        if isinstance(default, (list, tuple)):
            default = " ".join(map(str, default)) or "none"
        return f"{text} (default: {default})"


class ArgumentParser(argparse.ArgumentParser):
    """Flags spelt with hyphens (--max-steps, --log-dir, as nanoGPT's and build-nanogpt's users type
    them) are read as their underscore names, and the other way round."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", HelpFormatter)
        kwargs.setdefault("allow_abbrev", False)  # --max_step is a typo, not --max_steps
        super().__init__(*args, **kwargs)

    def parse_known_args(self, args=None, namespace=None):
        args = sys.argv[1:] if args is None else list(args)
        return super().parse_known_args([self._canonical(arg) for arg in map(str, args)], namespace)

    def _canonical(self, arg):
        if not arg.startswith("--") or arg == "--":
            return arg
        flag, sep, value = arg.partition("=")
        if flag in self._option_string_actions:
            return arg
        for other in (flag[:2] + flag[2:].replace("-", "_"), flag[:2] + flag[2:].replace("_", "-")):
            if other in self._option_string_actions:
                return other + sep + value
        return arg


_log_stream = None  # None: sys.stdout at the time of the call (a progress bar may have replaced it)


def log(*parts):
    """Print one line for the user, on rank 0 only: torchrun sets RANK in every process it starts, and a process
    without torchrun is rank 0. Modules call this rather than print, so no rank but 0 ever repeats a line and no
    constructor needs to be handed a print function."""
    if os.environ.get("RANK", "0") == "0":
        print(*parts, file=_log_stream or sys.stdout, flush=True)


@contextlib.contextmanager
def log_to(stream):
    """Send log lines to stream meanwhile: sys.stderr for commands whose stdout is their result."""
    global _log_stream
    previous, _log_stream = _log_stream, stream
    try:
        yield
    finally:
        _log_stream = previous


TRUE_WORDS, FALSE_WORDS = ("true", "1", "yes", "on", "y"), ("false", "0", "no", "off", "n")


def boolean_or_none(text):
    """True or False for the ways people write them (True, false, 1, 0, yes, no, on, off); None otherwise."""
    word = str(text).strip().lower()
    return True if word in TRUE_WORDS else False if word in FALSE_WORDS else None


def boolean(text):
    value = boolean_or_none(text)
    if value is None:
        raise argparse.ArgumentTypeError(f"{text!r} is neither true nor false (True/False, 1/0, yes/no, on/off)")
    return value


def positive_int(text):
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def main(run, argv=None):
    """run(argv), with a UserError turned into one line on stderr and an exit with its status.
    Returns run's return value (the exit status: an int, or None for 0): `sys.exit(main())`."""
    try:
        return run(argv)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(exc.exit_status)
