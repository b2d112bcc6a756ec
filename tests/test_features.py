"""Log-mel features: offline_mel against transformers' WhisperFeatureExtractor, and StreamingMel
against offline_mel (chunking invariance, frame count, values before and after the floor)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import WhisperFeatureExtractor

from duplex_chat.audio.constants import HOP_LENGTH, N_FFT, N_MELS, SAMPLE_RATE
from duplex_chat.audio.features import (
    DYNAMIC_RANGE_LOG10,
    LOG_OFFSET,
    LOG_SCALE,
    REFERENCE_PEAK_LOG10,
    StreamingMel,
    frame_count,
    offline_mel,
)

from .audio_helpers import espeak_speech

SENTENCE = "Please tell me what the weather will be like tomorrow in Paris."
TOLERANCE = 1e-5  # offline_mel vs the extractor, unfloored stream vs torch.stft (log10 units)
COUGH_S = 0.4  # seconds of synthetic cough
COUGH_BAND_HZ = (150.0, 600.0)  # a cough's energy sits low; a narrow band makes its bins loud
MIC_LEVEL_DB = -12.0  # speech level relative to espeak's (peaks near -14 dBFS), cough at -0.1 dBFS


@pytest.fixture(scope="module")
def speech() -> np.ndarray:
    """espeak-ng speech at 16 kHz, (n,) float32, about 4 s, starting with espeak's own silence."""
    return espeak_speech(SENTENCE)


@pytest.fixture(scope="module")
def extractor() -> WhisperFeatureExtractor:
    return WhisperFeatureExtractor(feature_size=N_MELS, sampling_rate=SAMPLE_RATE)


def cough(seconds: float = COUGH_S, seed: int = 0) -> np.ndarray:
    """A loud cough-like burst: band-passed noise with a fast attack and decay, peak 0.99, (n,)."""
    n = int(seconds * SAMPLE_RATE)
    rng = np.random.default_rng(seed)
    spectrum = np.fft.rfft(rng.standard_normal(n))
    freqs = np.fft.rfftfreq(n, 1.0 / SAMPLE_RATE)
    spectrum[(freqs < COUGH_BAND_HZ[0]) | (freqs > COUGH_BAND_HZ[1])] = 0
    t = np.arange(n) / SAMPLE_RATE
    burst = np.fft.irfft(spectrum, n) * np.exp(-t / 0.1) * (1 - np.exp(-t / 0.006))
    return (0.99 * burst / np.abs(burst).max()).astype(np.float32)


def speech_with_cough(speech: np.ndarray) -> np.ndarray:
    """Speech at a microphone-like level with a loud cough in its middle, (n,) float32."""
    quiet = speech * np.float32(10 ** (MIC_LEVEL_DB / 20))
    middle = len(quiet) // 2
    return np.concatenate([quiet[:middle], cough(), quiet[middle:]])


def whisper(extractor: WhisperFeatureExtractor, samples: np.ndarray) -> tuple[torch.Tensor, int]:
    """What the Qwen3-Omni processor gives: features (N_MELS, T) and the attention-mask sum."""
    out = extractor(samples, sampling_rate=SAMPLE_RATE, padding=True, truncation=False,
                    return_attention_mask=True, return_tensors="pt")
    return out["input_features"][0], int(out["attention_mask"].sum())


def stft_log_mel(extractor: WhisperFeatureExtractor, samples: np.ndarray) -> torch.Tensor:
    """Whisper's own recipe (torch.stft, its filter bank) stopped before the floor: (N_MELS, T)."""
    stft = torch.stft(torch.from_numpy(samples), N_FFT, HOP_LENGTH,
                      window=torch.hann_window(N_FFT), return_complex=True)
    power = stft[..., :-1].abs() ** 2
    mel = torch.from_numpy(extractor.mel_filters).float().T @ power
    return torch.clamp(mel, min=1e-10).log10()


def stream(samples: np.ndarray, chunk: int, **options) -> torch.Tensor:
    """Feed `samples` `chunk` at a time, then finish: all frames, (N_MELS, T)."""
    mel = StreamingMel(**options)
    frames = [mel.feed(samples[i : i + chunk]) for i in range(0, len(samples), chunk)]
    frames.append(mel.finish())
    assert mel.frames_emitted == frame_count(len(samples))
    return torch.cat(frames, dim=1)


def to_log10(features: torch.Tensor) -> torch.Tensor:
    """Undo Whisper's (x + 4) / 4."""
    return features * LOG_SCALE - LOG_OFFSET


@pytest.mark.parametrize("n_samples", [201, 239, 240, 359, 360, 4017, None])
def test_offline_mel_matches_whisper_extractor(speech, extractor, n_samples):
    clip = speech[:n_samples]
    expected, expected_frames = whisper(extractor, clip)
    features, n_frames = offline_mel(clip)
    assert n_frames == expected_frames == features.shape[1] == len(clip) // HOP_LENGTH
    assert features.shape == expected.shape and features.dtype == torch.float32
    assert (features - expected).abs().max() <= TOLERANCE


def test_offline_mel_of_speech_with_cough_matches_whisper_extractor(speech, extractor):
    clip = speech_with_cough(speech)
    expected, _ = whisper(extractor, clip)
    assert (offline_mel(clip)[0] - expected).abs().max() <= TOLERANCE


def test_chunking_does_not_change_a_bit(speech):
    one_shot = stream(speech, len(speech))
    for chunk in (317, 80_000):
        assert torch.equal(stream(speech, chunk), one_shot), chunk
    # ragged chunks, empty ones included
    rng = np.random.default_rng(1)
    mel, frames, position = StreamingMel(), [], 0
    while position < len(speech):
        size = int(rng.integers(0, 2500))
        frames.append(mel.feed(speech[position : position + size]))
        position += size
    frames.append(mel.finish())
    assert torch.equal(torch.cat(frames, dim=1), one_shot)


def test_one_sample_at_a_time_on_a_short_clip(speech):
    clip = speech_with_cough(speech)[len(speech) // 2 - 3000 : len(speech) // 2 + 3017]
    assert torch.equal(stream(clip, 1), stream(clip, len(clip)))
    assert torch.equal(stream(clip, 1, apply_floor=False), stream(clip, 317, apply_floor=False))


@pytest.mark.parametrize("n_samples", [0, 100, 159, 160, 200, 201, 359, 360, 399, 400, 481,
                                       4000, 4039, 4040, 4159])
def test_frame_count_equals_offline(speech, n_samples):
    clip = speech[:n_samples]
    mel = StreamingMel()
    fed = mel.feed(clip)
    tail = mel.finish()
    assert fed.shape[1] + tail.shape[1] == offline_mel(clip)[1] == n_samples // HOP_LENGTH
    assert tail.shape[1] == (1 if n_samples >= HOP_LENGTH and n_samples % HOP_LENGTH < 40
                             or HOP_LENGTH <= n_samples <= 200 else 0)


def test_frames_are_emitted_once_their_samples_have_arrived(speech):
    mel = StreamingMel()
    for n in range(1, 2000):
        mel.feed(speech[n - 1 : n])
        # frame t covers samples [160 t - 200, 160 t + 200); frame 0 also needs sample 200
        assert mel.frames_emitted == ((n - 40) // HOP_LENGTH if n > 200 else 0), n


def test_unfloored_stream_equals_stft_log_mel(speech, extractor):
    """Before the floor, streamed frames equal Whisper's recipe within 1e-5 (measured 9.5e-7 in
    log10; offline_mel vs the extractor: 1.2e-7 after normalisation)."""
    for clip in (speech, speech_with_cough(speech), speech[:4039], speech[:201]):
        streamed = to_log10(stream(clip, 317, apply_floor=False))
        reference = stft_log_mel(extractor, clip)
        assert streamed.shape == reference.shape
        assert (streamed - reference).abs().max() <= TOLERANCE


def floor_difference(clip: np.ndarray) -> tuple[float, float, float, int, torch.Tensor,
                                                torch.Tensor]:
    """Streamed (317-sample chunks) vs offline features of `clip`.

    Returns (max, mean) |streamed - offline| in normalised units, the clip's loudest log10 mel
    bin, the frame holding it, and both (N_MELS, T) feature tensors.
    """
    offline, _ = offline_mel(clip)
    streamed = stream(clip, 317)
    difference = (streamed - offline).abs()
    peak_frame = int(offline.max(dim=0).values.argmax())
    peak = float(to_log10(offline).max())
    return float(difference.max()), float(difference.mean()), peak, peak_frame, streamed, offline


def assert_floor_error_bounded(clip: np.ndarray, mean_bound: float) -> int:
    """The streamed floor is at most (peak - reference) below the offline one and only before the
    loudest frame; from that frame on streamed and offline agree bit for bit. Returns that frame."""
    largest, mean, peak, peak_frame, streamed, offline = floor_difference(clip)
    assert peak > REFERENCE_PEAK_LOG10
    assert largest <= (peak - REFERENCE_PEAK_LOG10) / LOG_SCALE + TOLERANCE
    assert mean <= mean_bound
    assert torch.equal(streamed[:, peak_frame:], offline[:, peak_frame:])
    return peak_frame


def test_floored_stream_is_close_to_offline_on_speech(speech):
    """espeak speech (loudest log10 mel bin 1.16, above the reference 0.0). Measured: max 0.289,
    mean 0.0060 normalised units (6 % of values differ), all in frames before the loudest one,
    where digital silence is floored at -8 instead of -6.84."""
    assert_floor_error_bounded(speech, mean_bound=0.01)


def test_floored_stream_is_close_to_offline_with_a_loud_cough(speech):
    """Speech 12 dB under espeak's level with a cough peaking at -0.1 dBFS in its middle (loudest
    bin 1.44, in the cough). Measured: max 0.360, mean 0.035 normalised units (14 % of values
    differ); every frame from the cough on equals offline bit for bit."""
    peak_frame = assert_floor_error_bounded(speech_with_cough(speech), mean_bound=0.05)
    assert peak_frame >= len(speech) // 2 // HOP_LENGTH  # the cough is the loudest thing


def test_floor_starts_at_the_reference_and_follows_the_running_peak(speech):
    silence_then_speech = np.concatenate([np.zeros(3200, np.float32), speech])
    mel = StreamingMel(reference_peak_log10=0.5)
    first = mel.feed(silence_then_speech[:3000])
    # digital silence is floored at reference - 8, not left at log10(1e-10) = -10
    assert torch.equal(to_log10(first), torch.full_like(first, 0.5 - DYNAMIC_RANGE_LOG10))
    rest = torch.cat([mel.feed(silence_then_speech[3000:]), mel.finish()], dim=1)
    offline, _ = offline_mel(silence_then_speech)
    assert first.shape[1] + rest.shape[1] == offline.shape[1]
    raw_peak = float(to_log10(offline).max())
    assert mel.peak_log10 == pytest.approx(raw_peak, abs=1e-6)
    # a new turn with the last turn's peak as reference: identical to offline from frame 0
    mel.reset(reference_peak_log10=mel.peak_log10)
    again = torch.cat([mel.feed(silence_then_speech), mel.finish()], dim=1)
    assert torch.equal(again, offline)


def test_feed_after_finish_and_bad_shapes_are_refused(speech):
    mel = StreamingMel()
    with pytest.raises(ValueError):
        mel.feed(np.zeros((160, 2), np.float32))
    with pytest.raises(ValueError):
        mel.feed(np.zeros(160, np.int16))  # PCM16 must be scaled to [-1, 1] first
    mel.feed(speech[:1000])
    mel.finish()
    with pytest.raises(RuntimeError):
        mel.feed(speech[:10])
    mel.reset()
    assert mel.frames_emitted == 0 and mel.samples_received == 0
    assert torch.equal(torch.cat([mel.feed(speech[:1000]), mel.finish()], dim=1),
                       stream(speech[:1000], 1000))
