"""Whisper-style log-mel features for Qwen3-Omni's audio encoder, for a whole clip or streamed.

The reference is what the Qwen3-Omni processor computes: `WhisperFeatureExtractor(feature_size=128)`
called with `padding=True, truncation=False` on one clip of n samples at 16 kHz:

- STFT with a 400-sample periodic Hann window, hop 160, `center=True` (200 samples of reflect
  padding at each end), power spectrum, slaney mel filter bank (128 bins, 0-8 kHz);
- `log10(max(mel, 1e-10))`, then the whole-clip floor `max(x, x.max() - 8)`, then `(x + 4) / 4`;
- the last STFT frame is dropped, so a clip of n samples gives `n // 160` frames (all attended).

`offline_mel` reproduces that (within 1e-5 of the extractor). `StreamingMel` emits the same frames
one chunk at a time, as soon as each is final, and differs only in the floor, which it cannot take
from a maximum it has not seen yet (see `StreamingMel`).

Both compute frames in fixed blocks of `FRAMES_PER_BLOCK` frames aligned to the frame index, so a
frame's value never depends on how the audio was chunked: every frame goes through the same
kernels with the same shapes and the same position in its block, whatever the chunk sizes.
"""

from __future__ import annotations

import functools

import numpy as np
import torch
from transformers.audio_utils import mel_filter_bank

from .constants import HOP_LENGTH, N_FFT, N_MELS, SAMPLE_RATE

CENTER_PAD = N_FFT // 2  # samples of reflect padding at each end (torch.stft center=True)
N_FREQ_BINS = N_FFT // 2 + 1  # 201 rfft bins
MEL_MAX_HZ = SAMPLE_RATE / 2  # 8000 Hz: the filter bank spans 0 Hz to Nyquist
POWER_FLOOR = 1e-10  # power floor before log10 (Whisper's), i.e. a log10 of -10
DYNAMIC_RANGE_LOG10 = 8.0  # Whisper keeps 80 dB (8 in log10 of power) below the loudest bin
LOG_OFFSET = 4.0  # Whisper's normalisation: (log10 + 4) / 4
LOG_SCALE = 4.0
FRAMES_PER_BLOCK = 16  # frames computed together (160 ms); fixed, so chunking cannot change results

# Default floor reference of the streaming extractor, in log10 of mel power: frame t is floored
# at max(reference, loudest bin of frames 0..t) - 8. 0.0 is the loudest log-mel bin of speech
# peaking near -12 dBFS, the middle of ordinary microphone levels (espeak-ng's default output,
# peaking at -2 dBFS, reaches 1.25). StreamingMel's docstring says why a middle level.
REFERENCE_PEAK_LOG10 = 0.0


@functools.cache
def _mel_filters_np() -> np.ndarray:
    """Slaney mel filter bank, (N_FREQ_BINS, N_MELS) float64, computed once and read-only."""
    filters = mel_filter_bank(
        num_frequency_bins=N_FREQ_BINS,
        num_mel_filters=N_MELS,
        min_frequency=0.0,
        max_frequency=MEL_MAX_HZ,
        sampling_rate=SAMPLE_RATE,
        norm="slaney",
        mel_scale="slaney",
    )
    filters.setflags(write=False)
    return filters


def mel_filters() -> torch.Tensor:
    """The encoder's mel filter bank as the extractor applies it: (N_MELS, N_FREQ_BINS) float32."""
    return torch.tensor(_mel_filters_np().T, dtype=torch.float32)


def frame_count(n_samples: int) -> int:
    """Mel frames (= attention-mask length) the offline extractor gives for `n_samples` samples."""
    return int(n_samples) // HOP_LENGTH


def normalize_log_mel(log_mel: torch.Tensor, floor: torch.Tensor | float) -> torch.Tensor:
    """Whisper's last steps: `(max(log_mel, floor) + 4) / 4`.

    log_mel: (N_MELS, T) log10 of mel power; floor: scalar or (T,) per frame (broadcast over bins).
    """
    floored = torch.maximum(log_mel, torch.as_tensor(floor, dtype=log_mel.dtype))
    return (floored + LOG_OFFSET) / LOG_SCALE


class _MelKernel:
    """Raw log10 mel power of frames of a centre-padded signal, computed in aligned blocks."""

    def __init__(self) -> None:
        self.window = torch.hann_window(N_FFT, dtype=torch.float32)  # periodic, as torch.stft
        self.filters = mel_filters()

    def log_mel(self, padded: np.ndarray, offset: int, first: int, stop: int) -> torch.Tensor:
        """Frames `first`..`stop-1` -> (N_MELS, stop - first) float32 log10 mel power.

        `padded` holds the centre-padded signal from padded index `offset` on; frame t covers
        padded indices [t * HOP_LENGTH, t * HOP_LENGTH + N_FFT), which must all be in `padded`.
        """
        columns = []
        frame = first
        while frame < stop:
            block_first = frame - frame % FRAMES_PER_BLOCK
            block_stop = min(stop, block_first + FRAMES_PER_BLOCK)
            block = self._block(padded, offset, block_first, block_stop)
            columns.append(block[:, frame - block_first : block_stop - block_first])
            frame = block_stop
        if not columns:
            return torch.zeros((N_MELS, 0), dtype=torch.float32)
        return torch.cat(columns, dim=1)

    def _block(self, padded: np.ndarray, offset: int, block_first: int, block_stop: int
               ) -> torch.Tensor:
        """(N_MELS, FRAMES_PER_BLOCK) log-mel of one aligned block; rows past block_stop are zeros.

        Every frame is computed in the same (FRAMES_PER_BLOCK, N_FFT) batch at the same row
        whatever the chunking; rows do not mix in rfft or the filter-bank product.
        """
        frames = np.zeros((FRAMES_PER_BLOCK, N_FFT), dtype=np.float32)
        starts = np.arange(block_first, block_stop) * HOP_LENGTH - offset
        frames[: block_stop - block_first] = padded[starts[:, None] + np.arange(N_FFT)]
        # torch's FFT, as torch.stft uses (bit-equal frames): numpy's float32 FFT rounds
        # differently, up to 8e-4 in log10 on bins 90 dB under a frame's loudest
        spectrum = torch.fft.rfft(torch.from_numpy(frames) * self.window, dim=1)
        power = spectrum.real.square() + spectrum.imag.square()  # (FRAMES_PER_BLOCK, N_FREQ_BINS)
        mel = self.filters @ power.T.contiguous()
        return torch.clamp(mel, min=POWER_FLOOR).log10()


def _as_samples(samples: np.ndarray) -> np.ndarray:
    """Check and convert one chunk of 16 kHz mono audio to a contiguous float32 (n,) array."""
    data = np.asarray(samples)
    if data.ndim != 1:
        raise ValueError(f"expected mono samples of shape (n,), got shape {data.shape}")
    if not np.issubdtype(data.dtype, np.floating):
        raise ValueError(f"expected float samples in [-1, 1], got dtype {data.dtype}")
    return np.ascontiguousarray(data, dtype=np.float32)


def _reflect_pad(samples: np.ndarray) -> np.ndarray:
    """Centre padding of a whole clip: (n,) -> (n + 2 * CENTER_PAD,), reflect at both ends.

    Equals torch.stft's reflect padding for n > CENTER_PAD (torch refuses shorter clips); for
    shorter clips numpy reflects repeatedly, which keeps one-frame clips (160-200 samples) usable.
    """
    return np.pad(samples, CENTER_PAD, mode="reflect")


def offline_mel(samples: np.ndarray) -> tuple[torch.Tensor, int]:
    """Log-mel of a whole clip as the Qwen3-Omni processor computes it.

    samples: (n,) float at 16 kHz. Returns (features (N_MELS, T) float32, T) with
    T = n // HOP_LENGTH, equal to `WhisperFeatureExtractor(feature_size=128)(samples,
    padding=True, truncation=False)` within 1e-5 (that extractor raises for n <= 200; here
    clips shorter than one hop give T = 0 and 160-200 samples give one frame).
    """
    data = _as_samples(samples)
    n_frames = frame_count(len(data))
    if n_frames == 0:
        return torch.zeros((N_MELS, 0), dtype=torch.float32), 0
    log_mel = _MelKernel().log_mel(_reflect_pad(data), 0, 0, n_frames)
    return normalize_log_mel(log_mel, log_mel.max() - DYNAMIC_RANGE_LOG10), n_frames


class StreamingMel:
    """Incremental log-mel of one user turn: the offline frames, each emitted once it is final.

    `feed(chunk)` takes 16 kHz mono samples of any length and returns the frames that became
    final, (N_MELS, k) float32; `finish()` returns the last frame(s) at end of turn, so the
    frames of a whole turn number exactly `n // 160`, as offline. Frame t covers samples
    [160 t - 200, 160 t + 200): it is final once sample 160 t + 199 has arrived (frame 0 also
    needs sample 200, the source of the start's reflect padding). Only the turn's last frame
    can reach past the end (when n % 160 < 40); `finish()` reflects the tail for it as
    torch.stft does. The output is identical, bit for bit, whatever the chunk sizes.

    Floor policy. Offline, every bin is floored at (loudest bin of the whole clip) - 8, which a
    stream cannot know before the turn ends, and emitted frames are final (the engine encodes
    and prefills them at once). Frame t is floored at

        max(reference_peak_log10, loudest bin of frames 0..t) - 8

    - The running maximum makes the floor reach the offline one as soon as the turn's loudest
      frame has come; from that frame on the output equals `offline_mel` bit for bit (if that
      peak is above the reference). It only rises and depends on frames 0..t alone, so it does
      not depend on chunking.
    - The fixed reference sets the floor before anything loud has come. Without it, digital
      silence before the first word stays at -10 (normalised -1.5, a value the encoder never
      sees offline) where offline floors it near peak - 8 (about -7).
    - Errors left: frames before the turn's loudest frame are floored lower than offline when the
      turn peaks above the reference (transient: only until the peak), and a turn peaking below
      the reference is floored higher than offline throughout (persistent, but only on bins
      between its own peak - 8 and the reference - 8, i.e. 80 dB under its speech, where a real
      microphone's noise floor usually lies). A mid-level reference (0.0, speech near -12 dBFS)
      bounds both: on espeak speech and synthetic mic-level mixes from -2 to -30 dBFS, with and
      without a loud cough, it gave the smallest worst-case difference of the references tried
      (running maximum alone, -1, -0.5, 0, 0.5, 1): at most 0.44 normalised units, mean <= 0.03.
      Measured differences are asserted in tests/test_features.py.
    - For a microphone whose level is known, pass the level (or the last turn's `peak_log10`)
      to `reset(reference_peak_log10=...)`: the output stays deterministic, given the reference.

    `apply_floor=False` leaves the floor out (frames are `(log10 mel + 4) / 4`), for checks.
    """

    def __init__(
        self, *, reference_peak_log10: float = REFERENCE_PEAK_LOG10, apply_floor: bool = True
    ):
        self.reference_peak_log10 = float(reference_peak_log10)
        self.apply_floor = apply_floor
        self._kernel = _MelKernel()
        self.reset()

    @property
    def frames_emitted(self) -> int:
        """Frames returned by feed()/finish() since the last reset."""
        return self._frames_emitted

    @property
    def samples_received(self) -> int:
        """Samples fed since the last reset."""
        return self._n_samples

    @property
    def peak_log10(self) -> float:
        """Loudest log10 mel bin of the frames emitted since reset (-inf before the first)."""
        return self._peak

    def reset(self, reference_peak_log10: float | None = None) -> None:
        """Forget the turn: the next sample fed is sample 0 of a new turn.

        `reference_peak_log10`, if given, replaces the floor reference from now on.
        """
        if reference_peak_log10 is not None:
            self.reference_peak_log10 = float(reference_peak_log10)
        self._n_samples = 0
        self._frames_emitted = 0
        self._peak = -float("inf")  # loudest log10 mel bin emitted so far
        self._head = np.zeros(0, np.float32)  # first samples, until the start padding can be built
        self._padded = np.zeros(0, np.float32)  # centre-padded signal from padded index _offset on
        self._offset = 0
        self._padding_started = False
        self._finished = False

    def state(self) -> tuple:
        """The turn so far, for `restore` (a speculative end of turn taken back). Nothing here
        is changed in place (every update assigns new arrays), so holding the references is a
        copy."""
        return (self._n_samples, self._frames_emitted, self._peak, self._head, self._padded,
                self._offset, self._padding_started, self._finished)

    def restore(self, state: tuple) -> None:
        """Back to the moment `state()` was taken."""
        (self._n_samples, self._frames_emitted, self._peak, self._head, self._padded,
         self._offset, self._padding_started, self._finished) = state

    def feed(self, samples: np.ndarray) -> torch.Tensor:
        """Add (n,) float samples at 16 kHz; return the newly final frames, (N_MELS, k) float32."""
        if self._finished:
            raise RuntimeError("StreamingMel.feed after finish(): call reset() for a new turn")
        data = _as_samples(samples)
        self._n_samples += len(data)
        if self._padding_started:
            self._padded = np.concatenate([self._padded, data])
        else:
            self._head = np.concatenate([self._head, data])
            if len(self._head) <= CENTER_PAD:
                return self._emit(0)
            # reflect padding of the start: samples 200..1 go before sample 0, as in torch.stft
            self._padded = np.concatenate([self._head[CENTER_PAD:0:-1], self._head])
            self._head = np.zeros(0, np.float32)
            self._padding_started = True
        # frame t is final once its window [t * HOP, t * HOP + N_FFT) of the padded signal
        # (CENTER_PAD + n samples so far) is complete
        return self._emit((CENTER_PAD + self._n_samples - N_FFT) // HOP_LENGTH + 1)

    def finish(self) -> torch.Tensor:
        """End of turn: return the remaining frames, (N_MELS, k) float32 (k is 0 or 1).

        After it, feed() refuses samples until reset().
        """
        self._finished = True
        n_frames = frame_count(self._n_samples)
        if self._frames_emitted >= n_frames:
            return self._emit(self._frames_emitted)
        if not self._padding_started:
            self._padded, self._offset = _reflect_pad(self._head), 0
        else:
            # reflect padding of the end, only as far as the last frame reaches
            needed = (n_frames - 1) * HOP_LENGTH + N_FFT - (self._offset + len(self._padded))
            tail = self._padded[len(self._padded) - 1 - needed : len(self._padded) - 1][::-1]
            self._padded = np.concatenate([self._padded, tail])
        return self._emit(n_frames)

    def _emit(self, stop: int) -> torch.Tensor:
        """Compute frames frames_emitted..stop-1, floor them, and drop samples no longer needed."""
        first = self._frames_emitted
        if stop <= first:
            return torch.zeros((N_MELS, 0), dtype=torch.float32)
        log_mel = self._kernel.log_mel(self._padded, self._offset, first, stop)
        self._frames_emitted = stop
        # keep the padded signal from the start of the block of the next frame on
        keep_from = (stop - stop % FRAMES_PER_BLOCK) * HOP_LENGTH
        self._padded = self._padded[keep_from - self._offset :]
        self._offset = keep_from
        if not self.apply_floor:
            return normalize_log_mel(log_mel, -float("inf"))
        peaks = torch.cummax(log_mel.amax(dim=0).clamp(min=self._peak), dim=0).values
        self._peak = float(peaks[-1])
        floors = peaks.clamp(min=self.reference_peak_log10) - DYNAMIC_RANGE_LOG10
        return normalize_log_mel(log_mel, floors)
