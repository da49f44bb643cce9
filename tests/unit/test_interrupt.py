"""SIGTERM becomes Interrupted (a KeyboardInterrupt), even where a library swallows it."""

from __future__ import annotations

import os
import signal

import pytest

from lora_sweep.trial import interrupt


def test_sigterm_raises_interrupted_and_a_swallowed_one_is_raised_again():
    previous = interrupt.install()
    try:
        try:  # what datasets' fingerprinting does around dill: a bare except
            os.kill(os.getpid(), signal.SIGTERM)
            for _ in range(10_000):  # the handler runs at the next bytecode boundary
                pass
        except BaseException:  # noqa: B036
            pass
        with pytest.raises(interrupt.Interrupted, match="received SIGTERM"):
            interrupt.check()  # the training loop's per-step check
        assert signal.getsignal(signal.SIGTERM) == signal.SIG_IGN  # a second SIGTERM cannot cut clean-up
    finally:
        signal.signal(signal.SIGTERM, previous)
        interrupt.requested.clear()
