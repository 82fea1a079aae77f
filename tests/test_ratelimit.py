"""The in-memory rate limiter behind the brute-force and forced-refresh limits (fake clock)."""

import pytest

from server.ratelimit import RateLimiter, retry_after_header


class Clock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def test_limit_events_then_blocked_until_the_window_closes():
    clock = Clock()
    rl = RateLimiter(3, 60, clock=clock)
    for _ in range(3):
        assert rl.retry_after("a") == 0.0
        rl.hit("a")
    assert rl.retry_after("a") == pytest.approx(60.0)
    clock.now += 45
    assert rl.retry_after("a") == pytest.approx(15.0)
    clock.now += 15
    assert rl.retry_after("a") == 0.0  # the window is over: a fresh one starts at the next event
    rl.hit("a")
    assert rl.retry_after("a") == 0.0


def test_window_is_anchored_at_the_first_event():
    clock = Clock()
    rl = RateLimiter(2, 60, clock=clock)
    rl.hit("a")
    clock.now += 50
    rl.hit("a")
    assert rl.retry_after("a") == pytest.approx(10.0)  # 60 s after the first event, not the last


def test_keys_are_independent():
    rl = RateLimiter(1, 60, clock=Clock())
    rl.hit("a")
    assert rl.retry_after("a") > 0
    assert rl.retry_after("b") == 0.0


def test_acquire_counts_only_allowed_events():
    clock = Clock()
    rl = RateLimiter(2, 60, clock=clock)
    assert rl.acquire("a") == 0.0
    assert rl.acquire("a") == 0.0
    for _ in range(5):
        assert rl.acquire("a") == pytest.approx(60.0)  # refused calls do not extend the block
    clock.now += 60
    assert rl.acquire("a") == 0.0


def test_asking_never_creates_keys():
    rl = RateLimiter(1, 60, clock=Clock())
    for i in range(1000):
        assert rl.retry_after(f"10.0.{i // 256}.{i % 256}") == 0.0
    assert len(rl) == 0


def test_closed_windows_are_dropped():
    clock = Clock()
    rl = RateLimiter(5, 60, clock=clock)
    for i in range(100):
        rl.hit(f"k{i}")
    assert len(rl) == 100
    clock.now += 61
    assert len(rl) == 0


def test_memory_is_bounded_when_keys_rotate():
    clock = Clock()
    rl = RateLimiter(1, 60, max_keys=50, clock=clock)
    rl.hit("victim")
    for i in range(10_000):  # an attacker rotating addresses within one window
        rl.hit(f"rotating-{i}")
        assert len(rl._windows) <= 50
    assert len(rl) == 50
    assert rl.retry_after("rotating-9999") > 0  # the newest keys are kept, the oldest dropped
    assert rl.retry_after("victim") == 0.0


def test_rejects_nonsense_settings():
    with pytest.raises(ValueError):
        RateLimiter(0, 60)
    with pytest.raises(ValueError):
        RateLimiter(1, 0)


@pytest.mark.parametrize("seconds, header", [(0.0, "1"), (0.2, "1"), (1.0, "1"), (1.01, "2"), (59.5, "60")])
def test_retry_after_header_is_whole_seconds_rounded_up(seconds, header):
    assert retry_after_header(seconds) == header
