"""Signal levels in dBFS: the input meter of `talk` and the session's echo checks share one rule."""

from __future__ import annotations

import numpy as np

SILENCE_DB = -100.0  # dBFS reported for no samples or digital silence (the floor of `level_db`)


def level_db(x: np.ndarray) -> float:
    """RMS level of x (n,) float in [-1, 1], in dBFS (0 dB: a full-scale square wave), floored
    at SILENCE_DB for nothing or digital silence."""
    if len(x) == 0:
        return SILENCE_DB
    x64 = np.asarray(x, np.float64)  # a float64 sum: long quiet stretches keep their digits
    rms = float(np.sqrt(np.dot(x64, x64) / len(x64)))
    return max(SILENCE_DB, 20.0 * np.log10(rms + 1e-10))
