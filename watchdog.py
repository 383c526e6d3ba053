"""Hung ranks and lost peers: a rank that stops making progress, or whose collective fails because a
peer is gone, ends with one line, the full detail in <log_dir>/failures/rank<R>.log, and a non-zero
exit, so that torchrun's elastic agent restarts the group (--max-restarts), or the user resumes.

    with watching(hang_timeout, log_dir, rank):   # seconds without progress before the rank gives up; 0: off
        progress("train_step", step)               # each mark resets the clock and names the step and phase
        progress("eval")                           # ... also inside long phases (evaluation, checkpoints)
    is_peer_failure(exc)                           # a failed collective or store call of a group of several ranks
    peer_lost(exc, log_dir, rank) -> PeerLost      # its one-line error (a cli.UserError), the traceback in the log
    collective_timeout(hang_timeout)               # seconds for distributed.setup: past the watchdog's, or None
    restart_hint()                                 # what happens next: torchrun's restart, or --auto_resume
    failure_log(log_dir, rank) -> Path

The marks cost two assignments, so the loop makes them whether the watchdog runs or not; the peer
lost message uses them too. A hang is reported by a Python thread, which dumps every thread's
stack (faulthandler) into the log. Should the main thread hold the GIL and starve it, faulthandler's
own timer (a C thread) dumps the stacks to stderr and exits BACKSTOP_S later.
"""
import contextlib
import faulthandler
import json
import os
import signal
import socket
import sys
import threading
import time
import traceback
import types
from pathlib import Path

import environment  # noqa: F401  before torch: it sets variables torch reads when it loads
import torch.distributed as dist

import cli
import distributed

EXIT_HUNG = 3  # the exit status of a rank that the watchdog ended (a user error exits 1)
BACKSTOP_S = 60  # faulthandler's timer fires this long after the watchdog should have
COLLECTIVE_GRACE_S = 120  # the process group's timeout is the watchdog's plus this: the watchdog, with
# its stacks and the step, speaks first; the collective's own timeout is the backstop
FAILURES_DIR = "failures"


class PeerLost(cli.UserError):
    """A collective failed because another rank died, hung up, or cannot be reached."""


# Where this rank is: the step, the phase in it, and when it last made progress.
_marks = types.SimpleNamespace(step=None, phase="start-up", since=time.monotonic())


def progress(phase, step=None):
    """This rank is making progress in phase (of step, when given): the watchdog's clock starts again."""
    _marks.phase = phase
    if step is not None:
        _marks.step = step
    _marks.since = time.monotonic()


def where():
    """'step 20 (eval)', for messages."""
    return f"step {_marks.step} ({_marks.phase})" if _marks.step is not None else _marks.phase


def collective_timeout(hang_timeout):
    """The process group's timeout for a watchdog of hang_timeout seconds (None: torch's default)."""
    return hang_timeout + COLLECTIVE_GRACE_S if hang_timeout and hang_timeout > 0 else None


def failure_log(log_dir, rank):
    return Path(log_dir) / FAILURES_DIR / f"rank{rank}.log"


def restart_hint():
    """What happens after this rank exits: torchrun's next attempt, or the user's --auto_resume."""
    attempt, most = os.environ.get("TORCHELASTIC_RESTART_COUNT"), os.environ.get("TORCHELASTIC_MAX_RESTARTS")
    if attempt is not None and most is not None and int(attempt) < int(most):
        return (f"torchrun restarts the group (restart {int(attempt) + 1} of {most}) and --auto_resume continues "
                "from the newest checkpoint")
    spent = f"torchrun's {most} restarts are spent: " if most not in (None, "0") else ""
    return f"{spent}resume with --auto_resume (under torchrun --max-restarts N that happens by itself)"


@contextlib.contextmanager
def watching(hang_timeout, log_dir, rank):
    """Run the hang watchdog inside the block (no thread when hang_timeout is 0 or None). A lost peer's error
    leaves the block as PeerLost, which ignores torchrun's SIGTERM from then on: made here, inside the loop's
    GracefulStop (which leaves a handler set since in place), so a SIGTERM while the error unwinds the trainer
    cannot end the rank before it has said its one line."""
    progress("train_step")
    stop, thread = threading.Event(), None
    if hang_timeout and hang_timeout > 0:
        faulthandler.dump_traceback_later(hang_timeout + BACKSTOP_S, exit=True)  # the thread re-arms it as it runs
        thread = threading.Thread(target=_watch, args=(hang_timeout, log_dir, rank, stop), name="hang-watchdog",
                                  daemon=True)
        thread.start()
    try:
        yield
    except RuntimeError as exc:
        if not is_peer_failure(exc):
            raise
        raise peer_lost(exc, log_dir, rank) from None
    finally:
        if thread is not None:
            stop.set()
            thread.join()
            faulthandler.cancel_dump_traceback_later()


def _watch(hang_timeout, log_dir, rank, stop):
    interval = min(1.0, hang_timeout / 10)
    while not stop.wait(interval):
        idle = time.monotonic() - _marks.since
        if idle >= hang_timeout:
            _report_hang(idle, log_dir, rank)
        # Re-armed while this thread runs; should a GIL-holding main thread starve it, this fires.
        faulthandler.dump_traceback_later(hang_timeout - idle + BACKSTOP_S, exit=True)


def _report_hang(idle, log_dir, rank):
    """Every thread's stack into the log, one line on stderr, exit: the main thread is stuck, so
    nothing but os._exit ends the process."""
    faulthandler.cancel_dump_traceback_later()
    path, peers = failure_log(log_dir, rank), _peers_down(rank)
    stopped = _end_stopped_peers(rank)
    if stopped:
        peers += f" (ended now: torchrun would wait 30 s before killing a stopped {stopped})"
    why = f"; {peers}" if peers else ": this rank or a peer is hung (a peer's own log says if it saw the hang too)"
    line = f"rank {rank} made no progress for {idle:.0f} s in {where()}{why}"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a") as f:
            f.write(_header(rank) + line + "\n")
            f.flush()
            faulthandler.dump_traceback(file=f, all_threads=True)
        stacks = f"every thread's stack is in {path}"
    except OSError as exc:
        faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
        stacks = f"every thread's stack is above ({path} could not be written: {exc.strerror})"
    _tell_torchrun(line)
    print(f"error: {line}; {stacks}; exiting with status {EXIT_HUNG}: {restart_hint()}", file=sys.stderr, flush=True)
    os._exit(EXIT_HUNG)


def is_peer_failure(exc):
    """Whether exc is a failed collective or store call of a process group of several ranks: torch's
    DistError family (NCCL, store, network), or gloo's RuntimeError ('[.../gloo/transport/...] Read
    error ... Connection reset by peer')."""
    if not distributed.active() or dist.get_world_size() < 2:
        return False
    if "out of memory" in str(exc):  # CUDA's or MPS's, even from inside a collective: the device's own error
        return False
    return isinstance(exc, dist.DistError) or (isinstance(exc, RuntimeError) and any(
        mark in str(exc) for mark in ("gloo/", "Gloo", "NCCL", "Connection reset")))


def peer_lost(exc, log_dir, rank):
    """The PeerLost error for exc (is_peer_failure): one line naming the rank that is gone (where this
    machine can see it), the step, and what happens next; the traceback goes to the failure log."""
    # torchrun sends SIGTERM to the survivors as soon as it sees a worker die: this rank is on its way
    # out already, with its own line and exit status, so from here on it ignores the signal.
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, lambda *_: None)
    peers = _peers_down(rank, wait=0.5) or "another rank is gone or cannot be reached"
    path = failure_log(log_dir, rank)
    detail = "".join(traceback.format_exception(exc))
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a") as f:
            f.write(_header(rank) + f"{peers}; rank {rank} was in {where()}\n{detail}\n")
        details = f"details in {path}"
    except OSError as err:
        sys.stderr.write(detail)
        details = f"the traceback is above ({path} could not be written: {err.strerror})"
    line = f"{peers}: rank {rank}'s collective in {where()} failed with \"{_short(exc)}\"; {restart_hint()}; {details}"
    _tell_torchrun(line)
    return PeerLost(line)


def _short(exc):
    """The gist of a gloo or NCCL error: its first sentence without the source path."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    if text.startswith("[") and "] " in text:
        text = text.split("] ", 1)[1]
    text = text.split(". ")[0]
    return text if len(text) <= 120 else text[:117] + "..."


def _peers_down(rank, wait=0.0):
    """'rank 1 (pid 4242 on this machine) is gone' for the other ranks on this machine whose process
    has ended or is stopped, or '' when all of them run. A rank killed a moment ago may still be
    exiting: look again for up to `wait` seconds."""
    host, deadline = socket.gethostname(), time.monotonic() + wait
    while True:
        down = [(r, pid, state) for r, (h, pid) in enumerate(distributed.peer_processes())
                if r != rank and h == host and (state := _process_state(pid))]
        if down or time.monotonic() >= deadline:
            break
        time.sleep(0.05)
    return ", ".join(f"rank {r} (pid {pid} on this machine) is {state}" for r, pid, state in down)


def _end_stopped_peers(rank):
    """SIGKILL this machine's stopped ranks (SIGSTOP, a frozen process): they ignore torchrun's SIGTERM, which
    waits 30 s before its SIGKILL, and the group restarts without them anyway. Returns what was ended."""
    host, ended = socket.gethostname(), []
    for r, (h, pid) in enumerate(distributed.peer_processes()):
        if r != rank and h == host and _process_state(pid) == "stopped":
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
                ended.append(f"rank {r}")
    return ", ".join(ended)


def _process_state(pid):
    """'gone', 'stopped' (SIGSTOP, a debugger) or None (running) for a process of this machine."""
    if Path("/proc/self/stat").exists():  # Linux: a zombie is dead but still answers kill(pid, 0)
        try:
            code = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            return "gone"
        return {"Z": "gone", "X": "gone", "T": "stopped", "t": "stopped"}.get(code)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return "gone"
    except PermissionError:
        pass
    return None


def _header(rank):
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "-")
    return (f"\n==== {time.strftime('%Y-%m-%d %H:%M:%S')} rank {rank}, pid {os.getpid()} on {socket.gethostname()}, "
            f"torchrun attempt {attempt}\n")


def _tell_torchrun(line):
    """torchrun's failure summary shows this line instead of 'To enable traceback see ...'."""
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if not path:
        return
    with contextlib.suppress(OSError):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps({"message": line, "timestamp": int(time.time())}))
