"""SIGTERM (and Ctrl-C) end the current trial cleanly.

The handler raises Interrupted (a KeyboardInterrupt) where the main thread happens to be, as
Ctrl-C does. Some libraries swallow it there (datasets' fingerprinting runs dill inside a bare
`except:`), so the handler also sets a flag that the training loop checks every step (check()):
a swallowed interrupt is raised again at the next step instead of being lost.
"""

from __future__ import annotations

import signal
import threading

requested = threading.Event()


class Interrupted(KeyboardInterrupt):
    """SIGTERM or Ctrl-C: the trial ends as failed (interrupted), runs close, a re-run resumes."""


def _handler(signum, frame) -> None:
    requested.set()
    signal.signal(signum, signal.SIG_IGN)  # a second SIGTERM must not cut the clean-up short
    raise Interrupted(f"received {signal.Signals(signum).name}")


def install():
    """Handle SIGTERM like Ctrl-C; returns the previous handler (for signal.signal)."""
    requested.clear()
    return signal.signal(signal.SIGTERM, _handler)


def check() -> None:
    """Raise Interrupted if a signal arrived whose exception some library swallowed."""
    if requested.is_set():
        raise Interrupted("received SIGTERM")
