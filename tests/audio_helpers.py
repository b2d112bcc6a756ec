"""Test helpers for audio: speech from espeak-ng, synthetic signals and wav writers.

Shared by the audio, VAD and replay tests. Nothing here touches the network or a sound card.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import soxr

ESPEAK = shutil.which("espeak-ng")
requires_espeak = pytest.mark.skipif(ESPEAK is None, reason="espeak-ng is not installed")

ENERGY_FRAME_S = 0.010  # seconds per frame when measuring where speech is
ENERGY_FLOOR_DB = -40.0  # frames this far below the loudest frame count as silence


def espeak_speech(text: str, rate: int = 16_000, voice: str | None = None,
                  wpm: int | None = None) -> np.ndarray:
    """espeak-ng saying `text` (in `voice` at `wpm` words a minute, if given), as mono float32 of
    shape (n,) at `rate` Hz."""
    if ESPEAK is None:
        pytest.skip("espeak-ng is not installed")
    options = (["-v", voice] if voice else []) + (["-s", str(wpm)] if wpm else [])
    with tempfile.TemporaryDirectory() as tmp:
        raw = Path(tmp) / "speech.wav"
        subprocess.run([ESPEAK, *options, "-w", str(raw), text], check=True, capture_output=True)
        samples, native_rate = sf.read(str(raw), dtype="float32")
    if samples.ndim == 2:
        samples = samples.mean(axis=1)
    return soxr.resample(samples, native_rate, rate).astype(np.float32)


def espeak_wav(text: str, path: str | Path, rate: int = 16_000) -> Path:
    """Write espeak-ng saying `text` as a PCM16 mono wav at `rate` Hz; returns the path."""
    sf.write(str(path), espeak_speech(text, rate), rate, subtype="PCM_16")
    return Path(path)


def speech_edges(samples: np.ndarray, rate: int) -> tuple[int, int]:
    """(first, last+1) sample of the part of `samples` louder than ENERGY_FLOOR_DB re its peak."""
    frame = int(rate * ENERGY_FRAME_S)
    n = len(samples) // frame
    energy = (samples[: n * frame].reshape(n, frame).astype(np.float64) ** 2).mean(axis=1)
    db = 10 * np.log10(energy + 1e-20)
    loud = np.flatnonzero(db > db.max() + ENERGY_FLOOR_DB)
    return int(loud[0] * frame), int((loud[-1] + 1) * frame)


def sentences_with_pauses(
    sentences: list[str], pause_s: float, rate: int = 16_000, lead_s: float = 1.0
) -> tuple[np.ndarray, list[tuple[int, int]]]:
    """Speak each sentence with `pause_s` of digital silence between them (and `lead_s` before
    the first and after the last).

    Returns the audio (n,) float32 and each sentence's true (start, end) sample, measured from its
    own energy, on the returned timeline.
    """
    parts = [np.zeros(int(lead_s * rate), np.float32)]
    edges = []
    position = len(parts[0])
    for i, text in enumerate(sentences):
        speech = espeak_speech(text, rate)
        start, end = speech_edges(speech, rate)
        speech = speech[start:end]  # espeak pads with its own silence: keep the pauses exact
        edges.append((position, position + len(speech)))
        gap = pause_s if i < len(sentences) - 1 else lead_s
        parts += [speech, np.zeros(int(gap * rate), np.float32)]
        position += len(speech) + int(gap * rate)
    return np.concatenate(parts), edges


def sine(freq_hz: float, seconds: float, rate: int, amplitude: float = 0.5) -> np.ndarray:
    """A sine wave, float64 of shape (round(seconds * rate),)."""
    t = np.arange(int(round(seconds * rate))) / rate
    return amplitude * np.sin(2 * np.pi * freq_hz * t)


def dominant_frequency(samples: np.ndarray, rate: int) -> float:
    """Frequency in Hz of the strongest FFT bin (Hann window)."""
    spectrum = np.abs(np.fft.rfft(samples * np.hanning(len(samples))))
    return float(np.fft.rfftfreq(len(samples), 1.0 / rate)[np.argmax(spectrum)])


def write_audio(path: str | Path, data: np.ndarray, rate: int, subtype: str | None = None,
                format: str | None = None) -> Path:
    """Write (n,) or (n, channels) float data with soundfile (format from the suffix by default)."""
    sf.write(str(path), data, rate, subtype=subtype, format=format)
    return Path(path)


def write_long_tone_wav(path: str | Path, seconds: float, rate: int, freq_hz: float = 440.0,
                        block_s: float = 60.0) -> Path:
    """Write a long PCM16 mono sine wav block by block (never holding it all), for memory tests.

    Each block restarts the phase at a multiple of the period only when block_s * freq_hz is
    whole; callers that check content should choose such values.
    """
    block = sine(freq_hz, block_s, rate, amplitude=0.25).astype(np.float32)
    with sf.SoundFile(str(path), "w", samplerate=rate, channels=1, subtype="PCM_16") as f:
        remaining = int(round(seconds * rate))
        while remaining > 0:
            f.write(block[:remaining])
            remaining -= len(block)
    return Path(path)
