"""The echo canceller: removes a delayed, attenuated copy of the played signal, keeps the user."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from duplex_chat.audio.echo import EchoCanceller, echo_cancellation_status
from duplex_chat.audio.resample import resample

from .talk_harness import TEST_RATE, espeak

RATE = 16_000


def _speech(text: str, voice: str, seconds: float) -> np.ndarray:
    """espeak speech at 16 kHz, looped or cut to `seconds`."""
    audio = resample(espeak(text, voice, gain=0.5), TEST_RATE, RATE)
    return np.resize(audio, int(seconds * RATE)).astype(np.float32)


def _db(x: np.ndarray) -> float:
    return 10 * np.log10(np.mean(np.square(x, dtype=np.float64)) + 1e-12)


@pytest.fixture(scope="module")
def available():
    ok, detail = echo_cancellation_status()
    if not ok:
        pytest.skip(detail)


@pytest.mark.parametrize("delay_ms", [120, 300])
def test_echo_removed_and_double_talk_kept(available, delay_ms):
    if shutil.which("espeak-ng") is None:
        pytest.skip("espeak-ng is not installed")
    played = _speech("The quick brown fox jumps over the lazy dog again and again.", "en", 6.0)
    delay = delay_ms * RATE // 1000
    echo = np.zeros_like(played)
    echo[delay:] = 0.5 * played[:-delay]
    user = np.zeros_like(played)
    user[4 * RATE:5 * RATE] = _speech("Wait, stop please.", "en+f3", 1.0)
    mic = echo + user
    canceller = EchoCanceller(delay_ms=delay_ms)
    # Uneven chunks, as the control loop drains them.
    out = np.concatenate([canceller.process(mic[i:i + 437], played[i:i + 437])
                          for i in range(0, len(mic), 437)])
    assert abs(len(out) - len(mic)) < 2 * 160
    settled = slice(2 * RATE, 4 * RATE)  # echo only, after convergence
    assert _db(out[settled]) < _db(mic[settled]) - 25
    talk = slice(4 * RATE + 320, 5 * RATE)
    assert _db(out[talk]) > _db(user[talk]) - 8  # the user's voice survives (measured ~5 dB lower)


def test_first_echo_is_cancelled_without_a_delay_hint(available):
    """talk gives AEC3 no delay hint: with none it cancels the very first echo of a session at
    any delay it can search (a hint above the true delay let the first ~70 ms through at -6 dB)."""
    if shutil.which("espeak-ng") is None:
        pytest.skip("espeak-ng is not installed")
    played = np.concatenate([np.zeros(RATE, np.float32),
                             _speech("It is a quarter past three.", "en+m3", 2.0)])
    for delay_ms in (40, 300):
        delay = delay_ms * RATE // 1000
        mic = np.zeros_like(played)
        mic[delay:] = 0.5 * played[:-delay]
        canceller = EchoCanceller()
        out = np.concatenate([canceller.process(mic[i:i + 160], played[i:i + 160])
                              for i in range(0, len(mic), 160)])
        first = slice(RATE + delay, RATE + delay + 1024)  # the first two VAD windows of echo
        assert _db(out[first]) < _db(mic[first]) - 25, delay_ms


def test_echo_correlation_tells_a_delayed_copy_from_the_user():
    """The barge-in echo check: the reply's own echo is ~1 at any delay, the user's voice is not."""
    from duplex_chat.audio.echo import echo_correlation

    if shutil.which("espeak-ng") is None:
        pytest.skip("espeak-ng is not installed")
    played = _speech("It is a quarter past three in the afternoon.", "en+m3", 3.0)
    user = _speech("Stop, stop, wait a moment.", "en+f3", 1.0)
    span = 1024  # the two 32 ms windows of a barge-in onset
    end = 2 * RATE
    reference = played[end - RATE:end]  # 1 s of echo delays
    for delay_ms in (0, 250, 700):
        d = delay_ms * RATE // 1000
        echo = 0.3 * played[end - d - span:end - d]
        assert echo_correlation(echo, reference) > 0.99
    voiced = user[int(0.3 * RATE):int(0.3 * RATE) + span]
    assert echo_correlation(voiced, reference) < 0.9
    assert echo_correlation(voiced, np.zeros(RATE, np.float32)) == 0.0  # nothing played
