"""What a stop signal does while `qdylora train` runs: Ctrl-C, a scheduler's SIGTERM before
preemption or a closed terminal's SIGHUP ask for a checkpoint after the current step and a clean
stop; a second one stops at once (`Interrupts`, used by training.trainer)."""

from __future__ import annotations

import signal
import sys
import threading
from typing import Any, Optional


# What a user (Ctrl-C), a scheduler before preemption (SLURM, Kubernetes: SIGTERM) or a closed
# terminal (SIGHUP) sends: each asks for a checkpoint and a clean stop.
STOP_SIGNALS = tuple(getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, name))


class Interrupts:
    """What a stop signal does during `train` (in the main thread: signals are delivered there).

    Outside the training loop, Ctrl-C stops at once (KeyboardInterrupt, as without us) and is
    also remembered: Python drops an exception raised while a `__del__` runs ("Exception ignored
    in ..."), and a Ctrl-C that lands in one is lost. Measured: SIGINT 0.7 s and 1.0 s after the
    run directory appeared landed in regex's Group.__del__ while the tokenizer loaded, and the run
    trained to the end (exit 0; 2 of 11 delays). `check()` raises such a lost one again.
    In the loop (`defer()`), the first stop signal asks the loop to checkpoint and stop after the
    current step; a second acts at once (Ctrl-C: KeyboardInterrupt; SIGTERM, SIGHUP: the handler
    from before the run, by default the end of the process). A signal ignored before the run
    stays ignored (nohup: SIGHUP; a background job of a script: SIGINT).
    """

    def __init__(self) -> None:
        self.requested: Optional[int] = None  # the stop signal received
        self._before: dict[int, Any] = {}  # the handlers to restore; empty outside the main thread

    def __enter__(self) -> "Interrupts":
        if threading.current_thread() is threading.main_thread():
            self._before = {s: signal.getsignal(s) for s in STOP_SIGNALS}
            self._at_once()
        return self

    def __exit__(self, *exc) -> None:
        self._restore()

    def check(self) -> None:
        """Raise the KeyboardInterrupt of a Ctrl-C whose first one was lost."""
        if self.requested is not None:
            raise KeyboardInterrupt

    def defer(self) -> None:
        """From now on a stop signal only sets `requested`, for the loop to act on."""
        self.check()
        for s, old in self._before.items():
            if old is not signal.SIG_IGN:
                signal.signal(s, self._stop_after_step)

    def undefer(self) -> None:
        """Back to Ctrl-C at once (after the loop, or after a first stop signal)."""
        self._restore()
        self._at_once()

    def _at_once(self) -> None:
        if self._before.get(signal.SIGINT) is signal.default_int_handler:  # not ignored, not someone else's
            signal.signal(signal.SIGINT, self._stop_now)

    def _stop_now(self, signum, frame) -> None:
        self.requested = signum
        raise KeyboardInterrupt

    def _stop_after_step(self, signum, frame) -> None:
        self.requested = signum
        self.undefer()  # the next one acts at once
        print(f"\nqdylora: {signal.Signals(signum).name}: stopping after this step to write a checkpoint "
              "(send it again to stop now)", file=sys.stderr)

    def _restore(self) -> None:
        for s, old in self._before.items():
            signal.signal(s, old if old is not None else signal.SIG_DFL)
