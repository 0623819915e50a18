"""Coalesced wake-ups: few messages for a burst, and always one after its last listing."""

from __future__ import annotations

import time

from services.queue import WakeUps
from tests.support.service import wait_until


def test_a_burst_sends_few_wake_ups_and_one_after_the_last() -> None:
    sent: list[float] = []
    wake = WakeUps(lambda: sent.append(time.monotonic()), window=0.05)
    t0 = time.monotonic()
    last = t0
    while time.monotonic() - t0 < 0.5:  # a burst of accepts for half a second
        wake("id", 1)
        last = time.monotonic()
        time.sleep(0.001)
    wait_until(lambda: sent and sent[-1] >= last, 1.0, every=0.01)
    assert sent[-1] - last <= 0.2  # the trailing wake-up comes within about one window
    assert 5 <= len(sent) <= 0.5 / 0.05 + 3  # about one per window, not one per accept
    # spaced by about a window (a few ms of thread scheduling either way)
    assert all(b - a >= 0.03 for a, b in zip(sent, sent[1:], strict=False))


def test_a_lone_accept_wakes_at_once() -> None:
    sent: list[float] = []
    wake = WakeUps(lambda: sent.append(time.monotonic()), window=10.0)
    t0 = time.monotonic()
    wake("id", 1)
    assert len(sent) == 1 and sent[0] - t0 < 0.05
