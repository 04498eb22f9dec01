"""The exceptions users see: a problem with their input, fixable by them, and a training run
stopped by a signal."""

from __future__ import annotations


class QDyLoRAError(ValueError):
    """Bad input or setup. The message is one line that says what is wrong and how to fix it.

    The command-line tool prints it (without a traceback) and exits with status 2.
    """


class TrainingInterrupted(QDyLoRAError):
    """Ctrl-C, SIGTERM or SIGHUP during training: a checkpoint was written and the run can be
    resumed. `signum` is the signal (the command exits with 128 + signum, as a shell reports)."""

    def __init__(self, message: str, signum: int = 2) -> None:  # 2: SIGINT
        super().__init__(message)
        self.signum = int(signum)
