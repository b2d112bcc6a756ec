"""audio/files.py's WavWriter: a WAV written as audio arrives, whose header is right at every
flush (what talk's recordings and replay's --out rely on after a crash)."""

from __future__ import annotations

import shutil
import struct
import subprocess
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from duplex_chat.audio.files import FLUSH_INTERVAL_S, WavWriter
from duplex_chat.config import DuplexError

RATE = 16_000
SOX = shutil.which("sox")


def ramp(n: int, start: int = 0) -> np.ndarray:
    """Distinct float32 values, so a sample's place can be checked after reading back."""
    return (((np.arange(start, start + n) % 2000) - 1000) / 1000.0).astype(np.float32)


def sox_samples(path) -> int:
    """Samples (all channels) `sox FILE -n stat` reads: it trusts the header's data size."""
    result = subprocess.run([SOX, str(path), "-n", "stat"], capture_output=True, text=True,
                            check=True)
    line = next(x for x in result.stderr.splitlines() if x.startswith("Samples read"))
    return int(line.split(":")[1])


def declared_samples(path) -> int:
    """Samples (all channels) the header's data chunk declares, read with no audio library (so
    the check holds where sox is missing; libsndfile would recover uncounted samples itself)."""
    raw = Path(path).read_bytes()
    assert raw[:4] == b"RIFF" and raw[8:12] == b"WAVE"
    assert struct.unpack("<I", raw[4:8])[0] <= len(raw) - 8  # never more than the file holds
    position, sample_bytes = 12, None
    while True:
        kind = raw[position:position + 4]
        (size,) = struct.unpack("<I", raw[position + 4:position + 8])
        if kind == b"fmt ":
            sample_bytes = struct.unpack("<H", raw[position + 22:position + 24])[0] // 8
        if kind == b"data":
            assert position + 8 + size <= len(raw)
            return size // sample_bytes
        position += 8 + size


class Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


@pytest.mark.parametrize("subtype", ["FLOAT", "PCM_16"])
def test_the_header_counts_what_was_flushed_while_the_file_is_open(tmp_path, subtype):
    clock = Clock()
    path = tmp_path / "growing.wav"
    writer = WavWriter(path, RATE, subtype=subtype, clock=clock)
    assert sf.info(str(path)).frames == 0  # a valid, empty WAV from the start
    writer.write(ramp(1000))
    assert sf.info(str(path)).frames == 0  # less than FLUSH_INTERVAL_S since the last flush
    clock.t += FLUSH_INTERVAL_S
    writer.write(ramp(500, 1000))  # the write that finds the interval over flushes
    assert sf.info(str(path)).frames == 1500
    writer.write(ramp(700, 1500))
    writer.flush()
    back, rate = sf.read(str(path), dtype="float32")
    assert rate == RATE and sf.info(str(path)).subtype == subtype
    if subtype == "FLOAT":
        np.testing.assert_array_equal(back, ramp(2200))
    else:  # 16 bits: within half a step, where libsndfile reads x / 32768
        assert np.abs(back - ramp(2200) * 32767 / 32768).max() <= 0.5 / 32768 + 1e-7
    writer.close()
    writer.close()  # idempotent
    assert sf.info(str(path)).frames == 2200


@pytest.mark.skipif(SOX is None, reason="sox is not installed")
def test_sox_reads_a_stereo_file_left_open(tmp_path):
    path = tmp_path / "open.wav"
    writer = WavWriter(path, 24_000, channels=2, subtype="PCM_16", clock=Clock())
    writer.write(np.stack([ramp(3000), -ramp(3000)], axis=1))
    writer.flush()
    writer.write(np.zeros((999, 2), np.float32))  # not flushed: past the declared data
    assert sox_samples(path) == declared_samples(path) == 2 * 3000
    left_right, _ = sf.read(str(path), dtype="float32")
    assert left_right.shape == (3000, 2)
    np.testing.assert_allclose(left_right[:, 0], -left_right[:, 1], atol=1 / 32768)
    writer.close()
    assert sox_samples(path) == 2 * 3999


def test_a_file_that_would_pass_the_size_limit_goes_on_in_a_numbered_part(tmp_path):
    path = tmp_path / "long.wav"
    # Room for 100 float frames after the 58-byte header (the limit counts all but 8 bytes).
    max_bytes = 58 - 8 + 100 * 4 + 3
    with WavWriter(path, RATE, max_bytes=max_bytes, clock=Clock()) as writer:
        writer.write(ramp(130))
        writer.write(ramp(120, 130))
    assert writer.paths == [path, tmp_path / "long-2.wav", tmp_path / "long-3.wav"]
    assert [sf.info(str(p)).frames for p in writer.paths] == [100, 100, 50]
    assert all(p.stat().st_size - 8 <= max_bytes for p in writer.paths)
    joined = np.concatenate([sf.read(str(p), dtype="float32")[0] for p in writer.paths])
    np.testing.assert_array_equal(joined, ramp(250))
    assert writer.frames == 250


def test_a_missing_folder_is_one_clear_sentence(tmp_path):
    with pytest.raises(DuplexError, match=r"the folder .*nowhere does not exist\.$"):
        WavWriter(tmp_path / "nowhere" / "x.wav", RATE)
    with pytest.raises(ValueError, match="subtype"):
        WavWriter(tmp_path / "x.wav", RATE, subtype="PCM_24")
