"""Voice activity: the Silero wrapper and the streaming state machine."""

from __future__ import annotations

import sys
import warnings

import numpy as np
import pytest

from .audio_helpers import requires_espeak, sentences_with_pauses
from duplex_chat.audio.constants import SAMPLE_RATE, VAD_WINDOW_SAMPLES
from duplex_chat.audio.files import iter_audio_blocks, write_wav
from duplex_chat.audio.vad import (
    SileroVad,
    SpeechEnded,
    SpeechStarted,
    VoiceActivity,
)
from duplex_chat.config import DuplexError, VadSettings, load_settings

W = VAD_WINDOW_SAMPLES
EDGE_TOLERANCE = int(0.150 * SAMPLE_RATE)  # 150 ms

# In windows of 32 ms: min speech 8, end of turn 20, pre-roll 10.
SETTINGS = VadSettings(threshold=0.5, neg_threshold=0.35, min_speech_ms=256, end_of_turn_ms=640,
                       pre_roll_ms=320)


class LevelVad:
    """Stand-in model: a window's speech probability is its mean sample value."""

    def __init__(self):
        self.resets = 0

    def prob(self, window: np.ndarray) -> float:
        return float(window.mean())

    def reset(self) -> None:
        self.resets += 1


def levels(*segments: tuple[float, int]) -> np.ndarray:
    """Constant-level signal: each (probability, n_windows) segment, float32 (n,)."""
    return np.concatenate([np.full(n * W, p, np.float32) for p, n in segments])


def turns_of(blocks, settings: VadSettings, vad=None) -> list[tuple[int, int, int]]:
    """(audio start, end, onset) of each turn `VoiceActivity` finds in `blocks`, fed in order."""
    activity = VoiceActivity(settings, vad)
    events = [e for block in blocks for e in activity.feed(block)] + activity.finish()
    starts = [e for e in events if isinstance(e, SpeechStarted)]
    ends = [e for e in events if isinstance(e, SpeechEnded)]
    assert len(starts) == len(ends)
    return [(s.audio_start_index, e.sample_index, s.sample_index) for s, e in zip(starts, ends)]


def feed_in_chunks(activity: VoiceActivity, signal: np.ndarray, sizes) -> list:
    events, start, i = [], 0, 0
    while start < len(signal):
        size = sizes[i % len(sizes)]
        events += activity.feed(signal[start : start + size])
        start, i = start + size, i + 1
    return events + activity.finish()


# --- the state machine, with a scripted probability ------------------------------------------

def test_start_and_end_are_reported_at_the_right_time_and_place():
    activity = VoiceActivity(SETTINGS, LevelVad())
    signal = levels((0.0, 40), (0.9, 30), (0.0, 30))
    emitted_at = {}
    for w in range(len(signal) // W):
        for event in activity.feed(signal[w * W : (w + 1) * W]):
            emitted_at[type(event)] = (w, event)
    # Start confirmed after 8 windows of speech, reported at its onset; pre-roll 10 windows.
    assert emitted_at[SpeechStarted] == (47, SpeechStarted(40 * W, 30 * W))
    # End after 20 windows of silence, reported where the silence began.
    assert emitted_at[SpeechEnded] == (89, SpeechEnded(70 * W))
    assert not activity.in_speech and activity.finish() == []


def test_events_do_not_depend_on_chunk_sizes():
    signal = levels((0.0, 13), (0.9, 25), (0.2, 3), (0.9, 9), (0.0, 41), (0.7, 12), (0.0, 5))
    signal = signal + np.float32(0.01) * np.sin(np.arange(len(signal), dtype=np.float32))
    expected = feed_in_chunks(VoiceActivity(SETTINGS, LevelVad()), signal, [len(signal)])
    assert len(expected) == 4
    for sizes in ([1, 7, 512], [5120], [333, 1000, 2]):
        assert feed_in_chunks(VoiceActivity(SETTINGS, LevelVad()), signal, sizes) == expected


@pytest.mark.parametrize(
    "segments,onset_window",
    [
        (((0.9, 7), (0.0, 40)), None),  # shorter than min_speech: dropped
        (((0.9, 4), (0.4, 1), (0.9, 4), (0.0, 40)), 0),  # a dip above neg_threshold continues
        (((0.9, 4), (0.1, 1), (0.9, 8), (0.0, 40)), 5),  # a dip under it restarts the onset
        (((0.4, 30), (0.0, 40)), None),  # between the thresholds never starts speech
    ],
)
def test_short_blips_and_onset_hysteresis(segments, onset_window):
    events = feed_in_chunks(VoiceActivity(SETTINGS, LevelVad()), levels(*segments), [W])
    starts = [e.sample_index for e in events if isinstance(e, SpeechStarted)]
    assert starts == ([] if onset_window is None else [onset_window * W])


@pytest.mark.parametrize(
    "segments,end_window",
    [
        (((0.9, 20), (0.4, 30), (0.9, 5), (0.0, 25)), 55),  # between thresholds: still speech
        (((0.9, 20), (0.1, 10), (0.4, 15)), 20),  # silence started; "between" does not cancel it
        (((0.9, 20), (0.1, 19), (0.9, 1), (0.1, 19), (0.9, 1), (0.0, 20)), 60),  # pauses < 640 ms
    ],
)
def test_end_of_turn_hysteresis(segments, end_window):
    events = feed_in_chunks(VoiceActivity(SETTINGS, LevelVad()), levels(*segments), [W])
    assert [e for e in events if isinstance(e, SpeechEnded)] == [SpeechEnded(end_window * W)]


def test_pre_roll_is_clipped_at_zero_and_at_the_previous_turn():
    settings = VadSettings(threshold=0.5, neg_threshold=0.35, min_speech_ms=256,
                           end_of_turn_ms=640, pre_roll_ms=1000)  # pre-roll 31.25 windows
    signal = levels((0.0, 3), (0.9, 10), (0.0, 25), (0.9, 10), (0.0, 60), (0.9, 10), (0.0, 30))
    assert turns_of([signal], settings, vad=LevelVad()) == [
        (0, 13 * W, 3 * W),
        (13 * W, 48 * W, 38 * W),
        (108 * W - 16_000, 118 * W, 108 * W),
    ]


def test_finish_closes_an_open_turn():
    activity = VoiceActivity(SETTINGS, LevelVad())
    events = activity.feed(np.concatenate([levels((0.0, 2), (0.9, 10)), np.full(100, 0.9, "f4")]))
    assert events == [SpeechStarted(2 * W, 0)] and activity.in_speech
    assert activity.finish() == [SpeechEnded(12 * W + 100)]  # the samples still waiting count

    activity.reset()
    assert activity.samples_fed == 0 and activity.vad.resets == 2
    activity.feed(levels((0.9, 10), (0.1, 5)))
    assert activity.finish() == [SpeechEnded(10 * W)]  # at the silence start


def test_voice_activity_rejects_integer_samples():
    with pytest.raises(ValueError, match="float"):
        VoiceActivity(SETTINGS, LevelVad()).feed(np.zeros(512, np.int16))


# --- the real Silero model -------------------------------------------------------------------

SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "Please tell me what the weather will be like tomorrow.",
    "Okay.",
    "I would like to book a table for two people at eight o'clock tonight.",
]


@requires_espeak
def test_turns_in_espeak_speech_match_the_sentences(tmp_path):
    speech, edges = sentences_with_pauses(SENTENCES, pause_s=1.5)
    path = write_wav(tmp_path / "speech.wav", speech, SAMPLE_RATE)
    settings = load_settings(environ={}).vad  # the shipped defaults

    turns = turns_of(iter_audio_blocks(path, block_s=1.0), settings)

    assert len(turns) == len(SENTENCES)
    pre_roll = settings.pre_roll_ms * SAMPLE_RATE // 1000
    for (audio_start, turn_end, onset), (start, end) in zip(turns, edges):
        assert abs(onset - start) <= EDGE_TOLERANCE, (onset, start)
        assert abs(turn_end - end) <= EDGE_TOLERANCE, (turn_end, end)
        assert audio_start == max(onset - pre_roll, 0)


@pytest.mark.parametrize("rms", [0.0, 0.003, 0.01])
def test_no_turns_in_silence_or_quiet_white_noise(rms):
    noise = rms * np.random.default_rng(0).standard_normal(6 * SAMPLE_RATE).astype(np.float32)
    blocks = np.array_split(noise, 7)
    assert turns_of(blocks, load_settings(environ={}).vad) == []


@requires_espeak
def test_silero_probabilities_are_reproducible_after_reset():
    speech, _ = sentences_with_pauses(SENTENCES[:1], pause_s=0.5, lead_s=0.3)
    windows = speech[: len(speech) // W * W].reshape(-1, W)
    vad = SileroVad()
    first = [vad.prob(w) for w in windows]
    vad.reset()
    second = [vad.prob(w) for w in windows]
    assert first == second
    assert max(first) > 0.9 and min(first) < 0.1 and all(0.0 <= p <= 1.0 for p in first)
    with pytest.raises(ValueError, match="512"):
        vad.prob(np.zeros(480, np.float32))


def test_loading_silero_leaves_torch_alone(monkeypatch):
    # Importing the silero_vad package sets torch's threads to 1 for the whole process (and loads
    # its TorchScript model); SileroVad only finds the package's ONNX file, never imports it.
    import torch

    for name in [m for m in sys.modules if m == "silero_vad" or m.startswith("silero_vad.")]:
        monkeypatch.delitem(sys.modules, name)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(3)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            vad = SileroVad()
            vad.prob(np.zeros(W, np.float32))
        assert [f"{w.category.__name__}: {w.message}" for w in caught] == []
        assert torch.get_num_threads() == 3
        assert "silero_vad" not in sys.modules
    finally:
        torch.set_num_threads(threads)


@requires_espeak
def test_onnx_probabilities_are_the_torchscript_models(monkeypatch):
    """The ONNX export is the network silero-vad's own TorchScript model runs: the same
    probabilities on speech and pauses, window by window with the state carried."""
    import torch
    from silero_vad import load_silero_vad

    threads = torch.get_num_threads()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit.load's deprecation, not ours
        reference = load_silero_vad()
    torch.set_num_threads(threads)  # the import set it to 1
    speech, _ = sentences_with_pauses(SENTENCES[:2], pause_s=0.4, lead_s=0.2)
    windows = speech[: len(speech) // W * W].reshape(-1, W)
    vad = SileroVad()
    ours = np.array([vad.prob(w) for w in windows])
    with torch.no_grad():
        theirs = np.array([reference(torch.from_numpy(w.copy()), 16_000).item() for w in windows])
    assert ours.max() > 0.9 and ours.min() < 0.1
    assert np.max(np.abs(ours - theirs)) < 1e-5  # float32 rounding of the same graph: 4e-6 seen


def test_a_broken_silero_install_is_a_duplex_error(monkeypatch, tmp_path):
    from duplex_chat.audio import vad as vad_module

    monkeypatch.setattr(vad_module, "SILERO_ONNX_FILE", "no-such-model.onnx")
    with pytest.raises(DuplexError, match="The Silero VAD model .*no-such-model.onnx is missing"):
        SileroVad()
    damaged = tmp_path / "silero_vad.onnx"
    damaged.write_bytes(b"not a model")
    monkeypatch.setattr(vad_module, "silero_model_path", lambda: damaged)
    with pytest.raises(DuplexError, match="Could not load the Silero VAD model"):
        SileroVad()
