"""Ctrl-C: the one two-stage handler (first: stop at a safe point; second: stop at once) and how a stop is reported.

Used by the trainer (stop at the next optimiser step with a resume checkpoint) and by the launcher of
``--nproc`` runs (wait for the workers to do so). A run stopped either way ends in
:class:`TrainingInterrupted`, which the command line turns into its one-line message and status 130.
"""

from __future__ import annotations

import signal
import threading
from contextlib import contextmanager
from typing import Callable, Iterator


class TrainingInterrupted(KeyboardInterrupt):
    """A run stopped on Ctrl-C; the message says where, ``resume_file`` (if any) continues it exactly.

    A ``KeyboardInterrupt``: whoever handles Ctrl-C (the leaderboard) handles it.
    """

    def __init__(self, message: str, resume_file: str | None = None):
        super().__init__(message)
        self.resume_file = resume_file

    def __reduce__(self):
        return type(self), (self.args[0], self.resume_file)


@contextmanager
def two_stage_interrupt(first: Callable[[], None]) -> Iterator[None]:
    """SIGINT during the block: the first calls ``first`` (which asks for a stop at a safe point), a second raises
    ``KeyboardInterrupt`` at once. The previous handler is restored afterwards."""
    if threading.current_thread() is not threading.main_thread():
        yield  # signal handlers can only be set from the main thread
        return
    interrupted = []

    def handler(signum, frame):
        if interrupted:
            signal.default_int_handler(signum, frame)
        interrupted.append(signum)
        first()

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous if previous is not None else signal.default_int_handler)
