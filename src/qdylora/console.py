"""The library's messages: one logger, "qdylora", and how the command line shows it.

Library code never prints: it logs what a run reads and how it is set up (info) and what it
worked around (warning). `qdylora ...` shows those records as "qdylora: ..." lines on stderr
while the command runs (stdout keeps the command's own output: tables, JSON); a program that
imports qdylora configures logging as it likes.
"""

from __future__ import annotations

import contextlib
import logging
import sys
from typing import Iterator

log = logging.getLogger("qdylora")


class _Console(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        kind = "warning: " if record.levelno >= logging.WARNING else ""
        # sys.stderr looked up now, not when the handler was made: redirections and pytest's
        # capture replace it
        print(f"qdylora: {kind}{record.getMessage()}", file=sys.stderr, flush=True)


# Third-party lines that are not warnings for a qdylora user, by logger: bitsandbytes tries to
# download a faster CPU kernel from the Hugging Face hub at import on AVX512-BF16 CPUs and logs a
# warning when it cannot (offline, or without the `kernels` package), then uses its own kernel.
NOISE = {"bitsandbytes.backends.cpu.ops": ("Failed to load CPU gemm_4bit_forward from kernels-community",),
         # kernels >= 0.19 (pulled in by bitsandbytes' CPU backend) with HF_HUB_OFFLINE set
         "kernels._internals.hf_hub": ("Skipping publisher trust check for 'kernels-community/",)}


class _DropNoise(logging.Filter):
    def __init__(self, prefixes: tuple[str, ...]) -> None:
        super().__init__()
        self.prefixes = prefixes

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefixes)


@contextlib.contextmanager
def shown_on_console() -> Iterator[None]:
    """Inside the block, the logger's info and warnings go to stderr, and the `NOISE` lines of
    other libraries are dropped (their other warnings pass); as before after it."""
    handler, level, propagate = _Console(), log.level, log.propagate
    filters = {name: _DropNoise(prefixes) for name, prefixes in NOISE.items()}
    for name, f in filters.items():
        logging.getLogger(name).addFilter(f)
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False
    try:
        yield
    finally:
        log.removeHandler(handler)
        log.setLevel(level)
        log.propagate = propagate
        for name, f in filters.items():
            logging.getLogger(name).removeFilter(f)
