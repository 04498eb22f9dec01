"""The one exception type users see: a problem with their input, fixable by them."""

from __future__ import annotations


class QDyLoRAError(ValueError):
    """Bad input or setup. The message is one line that says what is wrong and how to fix it.

    The command-line tool prints it (without a traceback) and exits with status 2.
    """
