"""Reading and writing audio files: any rate, channel count and sample format in, 16 kHz mono out.

Everything soundfile (libsndfile) can open works: WAV (8/16/24/32-bit int, 32/64-bit float),
FLAC, OGG Vorbis/Opus, MP3, AIFF and more. Channels are averaged to mono, then soxr resamples to
the target rate. `iter_audio_blocks` does this block by block with a streaming resampler, so a
1-hour file never sits in memory at once; its concatenated output equals `read_audio` exactly.
Every problem with the file itself is a `DuplexError` with one sentence naming the file.

`write_wav` writes a whole array at once; `WavWriter` writes a WAV as audio arrives (talk's
recordings, replay's `--out`) and keeps its header true while it grows, so a crash leaves a file
every reader opens.
"""

from __future__ import annotations

import os
import struct
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import soundfile as sf

from duplex_chat.config import DuplexError

from .constants import DEFAULT_BLOCK_S, SAMPLE_RATE
from .resample import StreamResampler

READ_FRAMES = 65_536  # source frames read per soundfile call: bounds memory whatever block_s is
WRITE_SUBTYPES = ("PCM_16", "FLOAT")
FLUSH_INTERVAL_S = 1.0  # a growing WavWriter's header is at most this far behind its audio
PCM16_SCALE = 0x7FFF  # full scale of 16-bit samples, as libsndfile scales floats to them
# A RIFF chunk's size is 32 bits, so one WAV file holds at most this many bytes after its first 8.
RIFF_MAX_BYTES = 0xFFFF_FFFF
CONVERT_HINT = (
    "Use WAV, FLAC, OGG or MP3; convert other files first, "
    "e.g. `ffmpeg -i INPUT -ar 16000 out.wav`."
)


@dataclass(frozen=True)
class AudioInfo:
    """What a file holds, read from its header (nothing is decoded)."""

    path: Path
    duration_s: float  # seconds
    sample_rate: int  # Hz, the file's own rate
    channels: int
    frames: int  # samples per channel at `sample_rate`
    format: str  # container, e.g. "WAV", "FLAC", "OGG"
    subtype: str  # sample format, e.g. "PCM_16", "PCM_24", "FLOAT", "VORBIS"


def audio_info(path: str | os.PathLike) -> AudioInfo:
    """Header facts of an audio file (duration, rate, channels, sample format), for progress.

    Raises DuplexError when the file is missing, a directory, empty, not audio, or holds no audio.
    """
    with _open(Path(path)) as f:
        return _info_of(f, Path(path))


def iter_audio_blocks(
    path: str | os.PathLike, block_s: float = DEFAULT_BLOCK_S, rate: int = SAMPLE_RATE
) -> Iterator[np.ndarray]:
    """Yield a file's audio as mono float32 blocks of shape (round(block_s * rate),) in [-1, 1].

    Every block but the last has exactly that length; the last may be shorter (never empty). Memory
    stays at about two blocks plus `READ_FRAMES` source frames whatever the file's length. The
    file is checked when this is called, before any block (DuplexError as for `audio_info`).
    """
    block_samples = int(round(block_s * rate))
    if block_samples < 1:
        raise ValueError(f"block_s={block_s} gives no samples at {rate} Hz")
    path = Path(path)
    f = _open(path)
    _info_of(f, path)  # fails early on an empty file
    return _exact_blocks(_resampled_pieces(f, path, rate), block_samples)


def read_audio(path: str | os.PathLike, rate: int = SAMPLE_RATE) -> np.ndarray:
    """A whole file as mono float32 of shape (n,) at `rate` Hz, values in [-1, 1].

    n = round(frames * rate / file_rate). Peak memory is about twice the result.
    """
    blocks = list(iter_audio_blocks(path, block_s=DEFAULT_BLOCK_S, rate=rate))
    return np.concatenate(blocks)


def write_wav(
    path: str | os.PathLike, samples: np.ndarray, rate: int, subtype: str = "PCM_16"
) -> Path:
    """Write float samples, shape (n,) or (n, channels) in [-1, 1], as a WAV file at `rate` Hz.

    `subtype` "PCM_16" clips to [-1, 1] and rounds to 16 bits; "FLOAT" keeps float32 as is.
    """
    if subtype not in WRITE_SUBTYPES:
        raise ValueError(f"subtype must be one of {WRITE_SUBTYPES}, got {subtype!r}")
    path = Path(path)
    if not path.parent.is_dir():
        raise DuplexError(f"Cannot write {path}: the folder {path.parent} does not exist.")
    data = np.asarray(samples, dtype=np.float32)
    if subtype == "PCM_16":
        data = np.clip(data, -1.0, 1.0)
    try:
        sf.write(str(path), data, int(rate), subtype=subtype, format="WAV")
    except (OSError, sf.SoundFileError) as exc:
        raise DuplexError(f"Cannot write {path}: {_reason(exc)}.") from None
    return path


class WavWriter:
    """A WAV file written as audio arrives, whose header stays right while it grows.

    The RIFF and data sizes (and a float file's `fact` frame count) are rewritten at each
    `flush`, which `write` does by itself once `FLUSH_INTERVAL_S` has passed since the last one.
    So at any moment the header counts all the audio written up to at most that long ago, and a
    crash or a `kill -9` leaves a valid WAV that sox, libsndfile and players read; samples written
    after the last flush lie past the declared data and are ignored. The header is written with
    `os.pwrite`, which leaves the file position alone, so a signal that interrupts a flush never
    misplaces the next samples. Nothing is fsynced: what survives a process crash may not survive
    a power cut. A file that would pass the 4 GiB a RIFF header can count goes on in
    `<stem>-2.wav`, `<stem>-3.wav`..., each a complete WAV (`paths` lists them).

    `subtype` is one of WRITE_SUBTYPES: "FLOAT" keeps float32 as is, "PCM_16" clips to [-1, 1]
    and rounds to 16 bits (as `write_wav` does). Raises DuplexError when the file cannot be made.
    """

    def __init__(self, path: str | os.PathLike, rate: int, channels: int = 1,
                 subtype: str = "FLOAT", max_bytes: int = RIFF_MAX_BYTES,
                 clock=time.monotonic):
        if subtype not in WRITE_SUBTYPES:
            raise ValueError(f"subtype must be one of {WRITE_SUBTYPES}, got {subtype!r}")
        self.rate, self.channels, self.subtype = int(rate), int(channels), subtype
        self._dtype = np.dtype("<f4") if subtype == "FLOAT" else np.dtype("<i2")
        self._frame_bytes = self._dtype.itemsize * self.channels
        self._header_bytes = len(self._header(0))
        # Whole frames only, so that a file ends on a frame and the next part starts on one.
        room = max_bytes - (self._header_bytes - 8)
        self._max_frames = room // self._frame_bytes
        if self._max_frames < 1:
            raise ValueError(f"max_bytes={max_bytes} leaves no room for a frame")
        self._clock = clock
        self.paths: list[Path] = []
        self.frames = 0  # frames written, over all parts
        self.closed = False
        self._first = Path(path)
        self._file = self._open_part()
        self._part_frames = 0  # frames in the current part
        self._last_flush = clock()

    def write(self, samples: np.ndarray) -> None:
        """Append float samples, shape (n,) or (n, channels), values in [-1, 1]."""
        data = np.asarray(samples, dtype=np.float32).reshape(-1, self.channels)
        if self.subtype == "PCM_16":
            data = np.round(np.clip(data, -1.0, 1.0) * PCM16_SCALE)
        data = data.astype(self._dtype)
        while len(data):
            if self._part_frames == self._max_frames:
                self._next_part()
            n = min(len(data), self._max_frames - self._part_frames)
            self._file.write(data[:n].tobytes())
            self._part_frames += n
            self.frames += n
            data = data[n:]
        if self._clock() - self._last_flush >= FLUSH_INTERVAL_S:
            self.flush()

    def flush(self) -> None:
        """Hand what was written to the OS and make the header count it."""
        if self.closed:
            return
        self._file.flush()
        frames = (self._file.tell() - self._header_bytes) // self._frame_bytes
        os.pwrite(self._file.fileno(), self._header(frames), 0)
        self._last_flush = self._clock()

    def close(self) -> None:
        """Flush and close (idempotent)."""
        if self.closed:
            return
        self.flush()
        self._file.close()
        self.closed = True

    def __enter__(self) -> WavWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _open_part(self):
        n = len(self.paths) + 1
        path = self._first if n == 1 else self._first.with_name(
            f"{self._first.stem}-{n}{self._first.suffix}")
        if not path.parent.is_dir():
            raise DuplexError(f"Cannot write {path}: the folder {path.parent} does not exist.")
        try:
            handle = open(path, "wb")
        except OSError as exc:
            raise DuplexError(f"Cannot write {path}: {_reason(exc)}.") from None
        handle.write(self._header(0))
        handle.flush()  # a valid, empty WAV on disk from the start
        self.paths.append(path)
        return handle

    def _next_part(self) -> None:
        self.flush()
        self._file.close()
        self._file = self._open_part()
        self._part_frames = 0

    def _header(self, frames: int) -> bytes:
        """RIFF/WAVE header for `frames` frames: PCM, or IEEE float with the `fact` chunk that
        non-PCM formats carry."""
        data_bytes = frames * self._dtype.itemsize * self.channels
        block = self._dtype.itemsize * self.channels
        fmt = struct.pack("<HHIIHH", 3 if self.subtype == "FLOAT" else 1, self.channels,
                          self.rate, self.rate * block, block, 8 * self._dtype.itemsize)
        if self.subtype == "FLOAT":
            chunks = (b"fmt " + struct.pack("<I", len(fmt) + 2) + fmt + b"\0\0"
                      + b"fact" + struct.pack("<II", 4, frames))
        else:
            chunks = b"fmt " + struct.pack("<I", len(fmt)) + fmt
        body = b"WAVE" + chunks + b"data" + struct.pack("<I", data_bytes)
        return b"RIFF" + struct.pack("<I", len(body) + data_bytes) + body


def _open(path: Path) -> sf.SoundFile:
    """Open `path` for reading, turning every way it can fail into one clear DuplexError."""
    if not path.exists():
        raise DuplexError(f"Audio file {path} does not exist.")
    if path.is_dir():
        raise DuplexError(f"{path} is a directory, not an audio file.")
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise DuplexError(f"Cannot read {path}: {_reason(exc)}.") from None
    if size == 0:
        raise DuplexError(f"Audio file {path} is empty (0 bytes).")
    try:
        return sf.SoundFile(str(path))
    except sf.SoundFileError as exc:
        raise DuplexError(
            f"{path} is not an audio file soundfile can read ({_reason(exc)}).", hint=CONVERT_HINT
        ) from None
    except OSError as exc:
        raise DuplexError(f"Cannot read {path}: {_reason(exc)}.") from None


def _info_of(f: sf.SoundFile, path: Path) -> AudioInfo:
    if f.frames <= 0 or f.samplerate <= 0:
        f.close()
        raise DuplexError(f"Audio file {path} contains no audio (0 samples).")
    return AudioInfo(
        path=path,
        duration_s=f.frames / f.samplerate,
        sample_rate=int(f.samplerate),
        channels=int(f.channels),
        frames=int(f.frames),
        format=str(f.format),
        subtype=str(f.subtype),
    )


def _resampled_pieces(f: sf.SoundFile, path: Path, rate: int) -> Iterator[np.ndarray]:
    """Decode, downmix and resample `f` piece by piece; closes it at the end."""
    with f:
        resampler = StreamResampler(f.samplerate, rate)
        position = 0  # source frames read so far, for the error message
        while True:
            try:
                raw = f.read(READ_FRAMES, dtype="float32", always_2d=True)
            except sf.SoundFileError as exc:
                raise DuplexError(
                    f"Cannot decode {path} after {position / f.samplerate:.1f} s: "
                    f"{_reason(exc)}."
                ) from None
            if len(raw) == 0:
                break
            position += len(raw)
            # Averaging keeps full scale for identical channels; it sums any LFE channel in too.
            mono = raw[:, 0] if raw.shape[1] == 1 else raw.mean(axis=1, dtype=np.float32)
            yield resampler.process(mono)
        yield resampler.flush()


def _exact_blocks(pieces: Iterable[np.ndarray], size: int) -> Iterator[np.ndarray]:
    """Regroup arrays of any lengths into blocks of exactly `size` (the last one shorter)."""
    held: list[np.ndarray] = []
    held_len = 0
    for piece in pieces:
        held.append(piece)
        held_len += len(piece)
        if held_len < size:
            continue
        joined = np.concatenate(held)
        full = (len(joined) // size) * size
        for start in range(0, full, size):
            yield _clipped(joined[start : start + size])
        held, held_len = [joined[full:]], len(joined) - full
    if held_len:
        yield _clipped(np.concatenate(held))


def _clipped(block: np.ndarray) -> np.ndarray:
    # Float files may exceed full scale and resampling overshoots near it; the model wants [-1, 1].
    return np.clip(block, -1.0, 1.0).astype(np.float32, copy=False)


def _reason(exc: BaseException) -> str:
    """The useful tail of a soundfile/OS error message, without the repeated file name."""
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror.lower()
    text = str(exc).strip().rstrip(".").replace(". ", "; ")  # keep the message one sentence
    return text.split(": ", 1)[1] if text.startswith("Error opening") and ": " in text else text

