"""Pre-emption and Ctrl-C: finish the step, save, exit cleanly.

    with GracefulStop() as stop:        # handlers installed on entry, the previous ones put back on exit
        for step in ...:
            ...
            if stop.agreed(): save and break   # every rank gets the same answer

Pre-emption sends SIGTERM with a grace period; Ctrl-C sends SIGINT. The first of either asks for a
save at the end of the current step; a second Ctrl-C exits at once without saving.
"""
import os
import signal
import sys
import threading

import distributed


class GracefulStop:
    """A context manager: the handlers are installed on entry and the previous ones put back on exit,
    so a process that goes on after training (a notebook, a test, a forked worker) gets its own
    Ctrl-C and SIGTERM back."""

    def __init__(self):
        self.signal_name = None
        self._flag = False
        self._previous = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():  # signal handlers live in the main thread
            for signum in (signal.SIGTERM, signal.SIGINT):
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc):
        for signum, handler in self._previous.items():
            # a handler set since stays: watchdog.peer_lost ignores torchrun's SIGTERM while this rank says its
            # one line, and the error that follows it passes through here first
            if signal.getsignal(signum) == self._handle:
                signal.signal(signum, handler)
        self._previous.clear()

    def _handle(self, signum, frame):
        if self._flag and signum == signal.SIGINT:
            print("second Ctrl-C: exiting now without saving", file=sys.stderr)
            os._exit(130)
        self._flag = True
        self.signal_name = signal.Signals(signum).name
        print(f"{self.signal_name} received: finishing this step and saving a checkpoint "
              "(Ctrl-C again to exit at once)", file=sys.stderr)

    def agreed(self):
        """True when any rank was signalled; every rank gets the same answer (one all-reduce under DDP)."""
        signalled = bool(distributed.agree(self._flag, "max"))
        if signalled and self.signal_name is None:
            self.signal_name = "a signal on another rank"
        return signalled
