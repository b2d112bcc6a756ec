"""Reading any audio file as 16 kHz mono float32, streaming it block by block, writing wavs,
and chunked resampling."""

from __future__ import annotations

import struct
import tracemalloc

import numpy as np
import pytest
import soundfile as sf
import soxr

from .audio_helpers import dominant_frequency, sine, write_audio, write_long_tone_wav
from duplex_chat.audio.constants import SAMPLE_RATE
from duplex_chat.audio.files import audio_info, iter_audio_blocks, read_audio, write_wav
from duplex_chat.audio.resample import StreamResampler, resample
from duplex_chat.config import DuplexError


def expected_length(frames: int, rate: int) -> int:
    return int(np.floor(frames * SAMPLE_RATE / rate + 0.5))


def reference(data: np.ndarray, rate: int) -> np.ndarray:
    """What read_audio should return for float `data` (n,) or (n, ch): downmix then soxr."""
    mono = data if data.ndim == 1 else data.mean(axis=1)
    return np.clip(soxr.resample(mono.astype(np.float32), rate, SAMPLE_RATE), -1, 1)


# (suffix, soundfile subtype, max abs error against the float reference)
FORMATS = [
    ("wav", "PCM_U8", 2.0 / 256),
    ("wav", "PCM_16", 2.0 / 32768),
    ("wav", "PCM_24", 1e-6),
    ("wav", "PCM_32", 1e-6),
    ("wav", "FLOAT", 1e-6),
    ("wav", "DOUBLE", 1e-6),
    ("flac", "PCM_16", 2.0 / 32768),
    ("flac", "PCM_24", 1e-6),
    ("ogg", "VORBIS", None),  # lossy: checked by frequency and level only
    ("mp3", "MPEG_LAYER_III", None),
]


@pytest.mark.parametrize("suffix,subtype,tolerance", FORMATS)
def test_sample_formats_read_as_float_16k(tmp_path, suffix, subtype, tolerance):
    rate = 44_100
    data = np.stack([sine(1000, 1.0, rate), sine(1000, 1.0, rate)], axis=1)  # stereo, 0.5 peak
    path = write_audio(tmp_path / f"tone.{suffix}", data, rate, subtype=subtype)

    out = read_audio(path)

    assert out.dtype == np.float32 and out.ndim == 1
    assert len(out) == expected_length(len(data), rate)
    assert abs(dominant_frequency(out, SAMPLE_RATE) - 1000) < 2
    middle = out[1000:-1000]  # away from the resampler's edges
    assert np.sqrt(np.mean(middle**2)) == pytest.approx(0.5 / np.sqrt(2), rel=0.02)
    if tolerance is not None:
        assert np.abs(out - reference(data, rate)).max() < tolerance
    info = audio_info(path)
    assert (info.sample_rate, info.channels, info.frames) == (rate, 2, len(data))
    assert info.subtype == subtype and info.duration_s == pytest.approx(1.0)


@pytest.mark.parametrize(
    "rate,freq", [(8_000, 1000), (22_050, 3000), (48_000, 5000), (96_000, 5000)]
)
def test_any_rate_is_resampled_to_16k(tmp_path, rate, freq):
    seconds = 1.3
    path = write_audio(tmp_path / "tone.wav", sine(freq, seconds, rate), rate, subtype="FLOAT")
    out = read_audio(path)
    assert len(out) == expected_length(int(round(seconds * rate)), rate)
    assert abs(dominant_frequency(out, SAMPLE_RATE) - freq) < 2


def test_content_above_8khz_is_filtered_out(tmp_path):
    # A 12 kHz tone cannot exist at 16 kHz: it must be removed, not aliased to 4 kHz.
    path = write_audio(tmp_path / "high.wav", sine(12_000, 1.0, 96_000), 96_000, subtype="FLOAT")
    out = read_audio(path)
    assert np.sqrt(np.mean(out[500:-500] ** 2)) < 1e-3


def test_six_channels_are_averaged(tmp_path):
    rate = 48_000
    tone = sine(440, 1.0, rate)
    only_third = np.zeros((len(tone), 6))
    only_third[:, 2] = tone
    same_everywhere = np.repeat(tone[:, None], 6, axis=1)
    write_audio(tmp_path / "one.wav", only_third, rate, subtype="PCM_24")
    write_audio(tmp_path / "all.wav", same_everywhere, rate, subtype="PCM_24")
    write_audio(tmp_path / "mono.wav", tone, rate, subtype="PCM_24")

    assert audio_info(tmp_path / "one.wav").channels == 6
    mono = read_audio(tmp_path / "mono.wav")
    np.testing.assert_allclose(read_audio(tmp_path / "all.wav"), mono, atol=1e-6)
    np.testing.assert_allclose(read_audio(tmp_path / "one.wav"), mono / 6, atol=1e-6)


def test_loud_float_file_is_clipped_to_full_scale(tmp_path):
    path = write_audio(tmp_path / "loud.wav", 3.0 * sine(200, 0.5, 16_000), 16_000, subtype="FLOAT")
    out = read_audio(path)
    assert out.max() == pytest.approx(1.0) and out.min() == pytest.approx(-1.0)


def test_blocks_equal_whole_file_resampling(tmp_path):
    rate, block_s = 44_100, 0.37
    rng = np.random.default_rng(1)
    data = 0.3 * rng.standard_normal((int(2.9 * rate), 2))
    path = write_audio(tmp_path / "noise.flac", data, rate, subtype="PCM_24")
    stored = sf.read(str(path), dtype="float32")[0]

    blocks = list(iter_audio_blocks(path, block_s=block_s))

    size = int(round(block_s * SAMPLE_RATE))
    assert all(len(b) == size for b in blocks[:-1]) and 0 < len(blocks[-1]) <= size
    joined = np.concatenate(blocks)
    np.testing.assert_allclose(joined, reference(stored, rate), atol=1e-6)
    np.testing.assert_array_equal(joined, read_audio(path))


def test_one_hour_file_streams_in_bounded_memory(tmp_path):
    # 1 h at 8 kHz PCM16 is 57.6 MB on disk and 230 MB as 16 kHz float32; about 1 s to write+read.
    seconds, rate, block_s = 3600, 8_000, 30.0
    path = write_long_tone_wav(tmp_path / "hour.wav", seconds, rate, freq_hz=440, block_s=60)
    whole_bytes = seconds * SAMPLE_RATE * 4

    tracemalloc.start()
    try:
        total, largest, last = 0, 0, None
        for block in iter_audio_blocks(path, block_s=block_s):
            total += len(block)
            largest = max(largest, len(block))
            last = block
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()

    assert total == seconds * SAMPLE_RATE
    assert largest == block_s * SAMPLE_RATE
    assert peak < 0.1 * whole_bytes  # measured ~11 MB: about two blocks plus read buffers
    assert abs(dominant_frequency(last[:SAMPLE_RATE], SAMPLE_RATE) - 440) < 2


def _wav_with_codec(path, codec_tag: int):
    """A RIFF/WAVE file whose fmt chunk names `codec_tag` (e.g. 0x0161, WMA)."""
    fmt = struct.pack("<HHIIHHH", codec_tag, 1, 16_000, 32_000, 2, 16, 0)
    data = b"\x00" * 400
    body = b"WAVE" + b"fmt " + struct.pack("<I", len(fmt)) + fmt + b"data"
    body += struct.pack("<I", len(data)) + data
    path.write_bytes(b"RIFF" + struct.pack("<I", len(body)) + body)


def _make_bad(kind, tmp_path):
    path = tmp_path / {"dir": "folder.wav", "m4a": "song.m4a"}.get(kind, f"{kind}.wav")
    if kind == "dir":
        path.mkdir()
    elif kind == "text":
        path.write_text("This is not audio at all.\n" * 20)
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "header_only":
        sf.write(str(path), np.zeros(0, np.float32), 16_000)
    elif kind == "codec":
        _wav_with_codec(path, 0x0161)
    elif kind == "m4a":
        path.write_bytes(b"\x00\x00\x00\x20ftypM4A \x00\x00\x02\x00" + b"\x00" * 500)
    return path


@pytest.mark.parametrize(
    "kind,pattern",
    [
        ("missing", r"missing\.wav does not exist"),
        ("dir", r"folder\.wav is a directory, not an audio file"),
        ("text", r"text\.wav is not an audio file soundfile can read"),
        ("empty", r"empty\.wav is empty \(0 bytes\)"),
        ("header_only", r"header_only\.wav contains no audio"),
        ("codec", r"codec\.wav is not an audio file soundfile can read"),
        ("m4a", r"song\.m4a is not an audio file soundfile can read"),
    ],
)
@pytest.mark.parametrize("reader", [read_audio, audio_info, iter_audio_blocks])
def test_bad_inputs_give_one_clear_sentence(tmp_path, kind, pattern, reader):
    path = _make_bad(kind, tmp_path)
    with pytest.raises(DuplexError, match=pattern) as info:
        reader(path)  # iter_audio_blocks checks at call time, before any next()
    assert info.value.message.endswith(".") and "\n" not in info.value.message


def test_write_wav_round_trips_and_clips(tmp_path):
    tone = sine(300, 0.5, 24_000).astype(np.float32)
    path = write_wav(tmp_path / "out.wav", tone, 24_000)
    back, rate = sf.read(str(path), dtype="float32")
    assert rate == 24_000 and sf.info(str(path)).subtype == "PCM_16"
    assert np.abs(back - tone).max() <= 1.0 / 32767

    write_wav(tmp_path / "loud.wav", 2 * tone, 24_000)
    assert np.abs(sf.read(str(tmp_path / "loud.wav"))[0]).max() <= 1.0
    write_wav(tmp_path / "float.wav", 2 * tone, 24_000, subtype="FLOAT")
    kept = sf.read(str(tmp_path / "float.wav"), dtype="float32")[0]
    np.testing.assert_array_equal(kept, 2 * tone)

    with pytest.raises(DuplexError, match="does not exist"):
        write_wav(tmp_path / "no_such_dir" / "x.wav", tone, 24_000)


@pytest.mark.parametrize(
    "in_rate,out_rate,channels",
    [(48_000, 16_000, 1), (44_100, 16_000, 1), (16_000, 24_000, 1), (24_000, 44_100, 2),
     (16_000, 16_000, 1)],
)
def test_chunked_resampling_equals_one_shot(in_rate, out_rate, channels):
    rng = np.random.default_rng(0)
    shape = (int(1.7 * in_rate),) if channels == 1 else (int(1.7 * in_rate), channels)
    signal = (0.3 * rng.standard_normal(shape)).astype(np.float32)
    one_shot = resample(signal, in_rate, out_rate)
    stream = StreamResampler(in_rate, out_rate, channels)

    for _ in range(2):  # flush() resets: a second stream must give the same output
        pieces, start = [], 0
        while start < len(signal):
            size = int(rng.choice([0, 1, 7, 160, 511, 4800]))
            pieces.append(stream.process(signal[start : start + size]))
            start += size
        pieces.append(stream.flush())
        chunked = np.concatenate(pieces)
        assert chunked.shape == one_shot.shape
        np.testing.assert_allclose(chunked, one_shot, atol=1e-6)


def test_stream_resampler_rejects_wrong_shapes():
    with pytest.raises(ValueError, match=r"\(n, 2\)"):
        StreamResampler(48_000, 16_000, channels=2).process(np.zeros(100, np.float32))
    with pytest.raises(ValueError):
        StreamResampler(0, 16_000)
