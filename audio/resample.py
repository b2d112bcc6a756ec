"""Chunked sample-rate conversion with soxr, for files read block by block and for live streams.

`StreamResampler` feeds soxr's streaming resampler, so the concatenated output of any sequence
of chunks equals `soxr.resample` of the whole signal (bit-exact with soxr 1.1; tested).
"""

from __future__ import annotations

import numpy as np
import soxr

QUALITY = "HQ"  # soxr's high quality (linear phase); also soxr.resample's default


class StreamResampler:
    """Resample a stream chunk by chunk.

    Feed chunks of shape (n,) for one channel or (n, channels) for several, float32 in [-1, 1];
    each `process` returns what soxr has ready (shape (m,) or (m, channels), float32, m can be 0
    while the filter fills); `flush()` returns the tail at end of stream. After `flush()` the
    stream is reset and can take a new signal.
    """

    def __init__(self, in_rate: int, out_rate: int, channels: int = 1, quality: str = QUALITY):
        if in_rate <= 0 or out_rate <= 0:
            raise ValueError(f"sample rates must be positive, got {in_rate} -> {out_rate}")
        if channels < 1:
            raise ValueError(f"channels must be at least 1, got {channels}")
        self.in_rate = int(in_rate)
        self.out_rate = int(out_rate)
        self.channels = int(channels)
        self._stream = soxr.ResampleStream(
            self.in_rate, self.out_rate, self.channels, dtype="float32", quality=quality
        )

    @property
    def delay_s(self) -> float:
        """Seconds of output still held inside the filter (what `flush` will release)."""
        return self._stream.delay() / self.out_rate

    def process(self, chunk: np.ndarray) -> np.ndarray:
        """Resample one chunk: (n,) or (n, channels) float -> (m,) or (m, channels) float32."""
        return self._stream.resample_chunk(self._as_input(chunk), last=False)

    def flush(self) -> np.ndarray:
        """Return the last output samples held by the filter and reset for a new stream."""
        empty = np.zeros((0,) if self.channels == 1 else (0, self.channels), np.float32)
        tail = self._stream.resample_chunk(empty, last=True)
        self._stream.clear()
        return tail

    def reset(self) -> None:
        """Drop everything held (e.g. after a barge-in) and start a new stream."""
        self._stream.clear()

    def _as_input(self, chunk: np.ndarray) -> np.ndarray:
        data = np.ascontiguousarray(chunk, dtype=np.float32)
        if self.channels == 1 and data.ndim == 2 and data.shape[1] == 1:
            data = data[:, 0]
        expected = 1 if self.channels == 1 else 2
        if data.ndim != expected or (self.channels > 1 and data.shape[1] != self.channels):
            want = "(n,)" if self.channels == 1 else f"(n, {self.channels})"
            raise ValueError(f"chunk must have shape {want}, got {data.shape}")
        return data


def resample(samples: np.ndarray, in_rate: int, out_rate: int) -> np.ndarray:
    """One-shot resampling of a whole signal: (n,) or (n, channels) -> float32 at `out_rate`."""
    data = np.ascontiguousarray(samples, dtype=np.float32)
    if in_rate == out_rate:
        return data.copy()
    return soxr.resample(data, in_rate, out_rate, quality=QUALITY)
