"""The load generator's throughput estimate: requests split at the window's edges."""

from __future__ import annotations

import pytest

from bench.load import requests_served


def closed_loop_spans(clients: int, pass_s: float, offset_s: float, until_s: float) -> list[tuple[float, float]]:
    """Clients answered all at once at the end of every pass, as one batching worker answers them."""
    spans = []
    start = offset_s - pass_s
    while start < until_s:
        spans += [(start, start + pass_s)] * clients
        start += pass_s
    return spans


def test_a_request_counts_by_its_share_of_the_window() -> None:
    assert requests_served([(0.0, 2.0)], 1.0, 3.0) == pytest.approx(0.5)
    assert requests_served([(1.5, 2.5)], 1.0, 3.0) == pytest.approx(1.0)
    assert requests_served([(0.0, 1.0), (3.0, 4.0)], 1.0, 3.0) == 0.0
    assert requests_served([(0.0, 4.0)], 1.0, 3.0) == pytest.approx(0.5)


@pytest.mark.parametrize("opened_after_s", [0.01, 0.7, 1.6, 2.99])
def test_bursts_of_answers_are_counted_whatever_the_phase(opened_after_s: float) -> None:
    # Two workers, each answering 16 clients every 3 s, half a pass apart (ResNet101 at C=32 on a
    # small CPU); the window opens some time after one of them answered and lasts 10 s.
    spans = closed_loop_spans(16, 3.0, 0.0, 30.0) + closed_loop_spans(16, 3.0, 1.5, 30.0)
    t0 = 9.0 + opened_after_s
    true_rate = 32 / 3.0
    assert requests_served(spans, t0, t0 + 10.0) / 10.0 == pytest.approx(true_rate)
    ended = sum(1 for _, end in spans if t0 <= end <= t0 + 10.0)
    assert ended / 10.0 in (pytest.approx(9.6), pytest.approx(11.2))  # what counting answers gave
