"""The turn-taking measurement (tests/turn_taking.py) on a small set: it tells a cut-off from a
late decision, and both policies land where their rules put them. The whole curve is
benchmarks/turn_taking.py's (docs/turn-taking.md)."""

from __future__ import annotations

import pytest

from duplex_chat.audio.constants import SAMPLE_RATE, VAD_WINDOW_SAMPLES
from duplex_chat.audio.vad import SileroVad
from duplex_chat.config import load_settings

from .audio_helpers import requires_espeak
from .turn_taking import CachedModel, make_test_set, measure, silence_policy, smart_policy

pytestmark = requires_espeak
WINDOW_MS = 1000 * VAD_WINDOW_SAMPLES / SAMPLE_RATE


@pytest.fixture(scope="module")
def small_set():
    """Two complete utterances; hesitations of 400 and 444 ms (the first two of the set)."""
    return make_test_set(complete=2, hesitant=2)


def test_a_silence_shorter_than_the_hesitation_cuts_it_and_a_longer_one_does_not(small_set):
    settings = load_settings(environ={})
    short = measure("silence", "300", lambda: silence_policy(settings, 300, SileroVad()),
                    small_set)
    long = measure("silence", "600", lambda: silence_policy(settings, 600, SileroVad()),
                   small_set, speculate_ms=160)
    assert [o.cut_off for o in short.outcomes] == [False, False, True, True]
    assert short.hesitant_cut_off_rate == 1.0 and short.cut_off_rate == 0.5
    assert not any(o.cut_off for o in long.outcomes)
    # decided the policy's silence after the end, plus the VAD's lag of a few windows
    for outcome in long.outcomes:
        assert 600 <= outcome.latency_ms <= 600 + 4 * WINDOW_MS
    # a speculative start at the end of each turn, and one more at each hesitation
    assert [o.speculations for o in long.outcomes] == [1, 1, 2, 2]


def test_the_smart_policy_decides_at_the_pause_or_at_the_fallback(small_set):
    from duplex_chat.session.smart_turn import SmartTurnModel

    settings = load_settings(environ={})
    model = CachedModel(SmartTurnModel())
    point = measure("smart", "0.5", lambda: smart_policy(settings, model, SileroVad(),
                                                         pause_ms=250, threshold=0.5,
                                                         fallback_ms=1000), small_set)
    for outcome in point.outcomes:
        if not outcome.cut_off:  # the model's answer after the pause, or the fallback
            assert (250 <= outcome.latency_ms <= 250 + 80 + 4 * WINDOW_MS
                    or 1000 <= outcome.latency_ms <= 1000 + 4 * WINDOW_MS)
    assert model.answers  # it was asked
