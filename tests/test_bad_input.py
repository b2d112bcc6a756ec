"""`duplex-chat replay` through the real command line: bad input fails with one clean line, odd
but valid audio files are accepted, and a long file runs in bounded memory.

Every case is a subprocess (that is what users run, and what proves there is no traceback).
Importing torch costs ~2.5 s per process, so the cases are started together in a small pool as
soon as the module's first test runs; each test then checks its own case.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import soxr

from .audio_helpers import ESPEAK, espeak_speech, sine

_SCRIPT = Path(sys.executable).parent / "duplex-chat"
# The installed console script when there is one (it is what users run), else the module.
CLI = [str(_SCRIPT)] if _SCRIPT.is_file() else [sys.executable, "-m", "duplex_chat.cli.app"]

REPLY_CAPS = {"SCA_QWEN_MAX_REPLY_TOKENS": "6", "SCA_QWEN_MAX_REPLY_SECONDS": "0.8",
              "SCA_QWEN_GREEDY": "true"}
POOL_WORKERS = 3  # processes at once: enough to hide imports on 2 cores, little memory
CASE_TIMEOUT_S = 240
BEEP_HZ = 1000.0  # a short tone: audio, but not speech
FILE_S = 2.0  # length of the silence + beep files
LONG_FILE_S = 600.0  # the 1-hour file took 68 s here (> 60 s), so the test uses 10 minutes
SHORT_FILE_S = 10.0  # baseline for the memory comparison
LONG_RATE = 8000
NOISE_LEVEL = 0.01  # white noise RMS of the long file (-40 dBFS)
# Holding 10 min of 16 kHz float32 would take 38 MB (plus the decoded 8 kHz source): growth
# beyond the short file's peak must stay well under that.
MAX_RSS_GROWTH_KB = 25_000
# (rate, subtype, channels) of valid files that replay must read: 8/24-bit, float, 6 channels,
# 8 and 96 kHz.
FORMATS = {
    "pcm_u8": (16000, "PCM_U8", 1),
    "pcm_24": (44100, "PCM_24", 1),
    "float": (22050, "FLOAT", 1),
    "six_channels": (48000, "PCM_16", 6),
    "8khz": (8000, "PCM_16", 1),
    "96khz": (96000, "PCM_24", 1),
}
# `duplex-chat ARGS...` that writes its peak resident memory (KiB) to the file in argv[1].
# VmHWM, not ru_maxrss: Linux carries ru_maxrss over exec from the (large) pytest parent.
PEAK_MEMORY_WRAPPER = """
import re, sys
from duplex_chat.cli.app import main
try:
    main(sys.argv[2:])
finally:
    status = open("/proc/self/status").read()
    open(sys.argv[1], "w").write(re.search(r"VmHWM:\\s*(\\d+)", status)[1])
"""


@dataclass
class Outcome:
    code: int
    stdout: str
    stderr: str
    seconds: float
    peak_rss_kb: int | None = None


def run_cli(args: list[str], env: dict | None = None, rss_file: Path | None = None) -> Outcome:
    """Run `duplex-chat ARGS`; with `rss_file`, through a wrapper that records peak memory."""
    if rss_file is None:
        cmd = [*CLI, *args]
    else:
        cmd = [sys.executable, "-c", PEAK_MEMORY_WRAPPER, str(rss_file), *args]
    started = time.perf_counter()
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=CASE_TIMEOUT_S,
                            env={**os.environ, **(env or {})})
    seconds = time.perf_counter() - started
    rss = int(rss_file.read_text()) if rss_file is not None and rss_file.exists() else None
    return Outcome(result.returncode, result.stdout, result.stderr, seconds, rss)


def assert_one_clean_line(outcome: Outcome, *parts: str) -> str:
    """Non-zero exit, stderr one line starting "duplex-chat:", no traceback; returns the line."""
    assert outcome.code != 0
    assert "Traceback" not in outcome.stderr + outcome.stdout
    lines = outcome.stderr.strip().splitlines()
    assert len(lines) == 1, outcome.stderr
    assert lines[0].startswith("duplex-chat: ")
    for part in parts:
        assert part in lines[0]
    return lines[0]


# ------------------------------------------------------------------------------ the files


def silence_and_beep(path: Path, rate: int, subtype: str, channels: int) -> Path:
    """FILE_S of silence with a 0.2 s beep in it, in every channel."""
    x = np.zeros(int(FILE_S * rate))
    beep = sine(BEEP_HZ, 0.2, rate, amplitude=0.3)
    x[rate // 2: rate // 2 + len(beep)] = beep
    data = np.repeat(x[:, None], channels, axis=1) if channels > 1 else x
    sf.write(str(path), data, rate, subtype=subtype)
    return path


def noise_file(path: Path, seconds: float, rate: int) -> Path:
    """Low white noise, written a minute at a time."""
    rng = np.random.default_rng(0)
    with sf.SoundFile(str(path), "w", rate, 1, "PCM_16") as f:
        remaining = int(seconds * rate)
        while remaining > 0:
            n = min(remaining, 60 * rate)
            f.write((rng.standard_normal(n) * NOISE_LEVEL).astype(np.float32))
            remaining -= n
    return path


def speech_8k_8bit(path: Path) -> Path:
    speech = soxr.resample(espeak_speech("What will the weather be like tomorrow?"), 16000, 8000)
    pad = np.zeros(int(0.5 * 8000))
    sf.write(str(path), np.concatenate([pad, speech, pad, pad, pad]), 8000, subtype="PCM_U8")
    return path


def make_cases(d: Path, checkpoint: Path) -> dict[str, tuple]:
    """name -> (args, env, rss_file) for every subprocess this module runs."""
    silent = d / "silent.wav"
    sf.write(str(silent), np.zeros(3 * 16000, np.float32), 16000)
    (d / "text.wav").write_text("this is not audio\n")
    (d / "empty.wav").write_bytes(b"")
    sf.write(str(d / "zero.wav"), np.zeros(0, np.float32), 16000)
    (d / "unknown_key.toml").write_text('[qwen]\nvoice = "Ethan"\nspeed = 2\n')
    model = ["--model", str(checkpoint), "--device-map", "cpu", "--dtype", "float32"]
    cases = {
        "missing_file": ([str(d / "nope.wav")], None, None),
        "text_file": ([str(d / "text.wav")], None, None),
        "empty_file": ([str(d / "empty.wav")], None, None),
        "zero_length_wav": ([str(d / "zero.wav")], None, None),
        # A model that does not exist: the run only gets to "no speech" if it never loads one.
        "no_speech": ([str(silent), "--model", str(d / "no-model")], None, None),
        "unknown_voice": ([str(silent), "--voice", "Bob"], None, None),
        "bad_env_dtype": ([str(silent)], {"SCA_QWEN_TORCH_DTYPE": "fp8"}, None),
        "unknown_config_key": ([str(silent), "--config", str(d / "unknown_key.toml")], None, None),
        "out_folder_missing": ([str(silent), "--out", str(d / "no-dir" / "o.wav")], None, None),
        "long_short": ([str(noise_file(d / "short.wav", SHORT_FILE_S, LONG_RATE))], None,
                       d / "short.rss"),
        "long": ([str(noise_file(d / "long.wav", LONG_FILE_S, LONG_RATE))], None, d / "long.rss"),
    }
    for name, (rate, subtype, channels) in FORMATS.items():
        cases[f"format_{name}"] = (
            [str(silence_and_beep(d / f"{name}.wav", rate, subtype, channels)), *model], None, None)
    if ESPEAK is not None:
        cases["speech_8k_8bit"] = ([str(speech_8k_8bit(d / "speech8k.wav")), "--json",
                                    "--out", str(d / "speech8k_out.wav"), *model],
                                   REPLY_CAPS, None)
    return cases


@dataclass
class Runs:
    """The module's subprocesses, running or done, and the folder of their files."""

    folder: Path
    futures: dict[str, Future]

    def __getitem__(self, name: str) -> Outcome:
        return self.futures[name].result()


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory, tiny_checkpoint) -> Runs:
    """Every case started in a pool; tests wait only for their own."""
    folder = tmp_path_factory.mktemp("bad-input")
    cases = make_cases(folder, tiny_checkpoint)
    pool = ThreadPoolExecutor(max_workers=POOL_WORKERS)
    # The long run first: it is the slowest, so it overlaps with everything else.
    order = sorted(cases, key=lambda name: name != "long")
    futures = {name: pool.submit(run_cli, ["replay", *cases[name][0]], *cases[name][1:])
               for name in order}
    yield Runs(folder, futures)
    pool.shutdown(wait=True, cancel_futures=True)


# ---------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("name, parts", [
    ("missing_file", ("nope.wav", "does not exist")),
    ("text_file", ("text.wav", "not an audio file")),
    ("empty_file", ("empty.wav", "empty")),
    ("zero_length_wav", ("zero.wav", "no audio")),
    ("unknown_voice", ("qwen.voice", "'Bob'", "--voice", "Ethan, Chelsie, Aiden")),
    ("bad_env_dtype", ("qwen.torch_dtype", "'fp8'", "SCA_QWEN_TORCH_DTYPE", "bfloat16")),
    ("unknown_config_key", ("qwen.speed", "unknown_key.toml", "voice")),
    ("out_folder_missing", ("o.wav", "no-dir", "does not exist")),
])
def test_bad_input_is_one_clean_line(outcomes, name, parts):
    assert_one_clean_line(outcomes[name], *parts)


def test_no_speech_says_so_without_loading_the_model(outcomes):
    line = assert_one_clean_line(outcomes["no_speech"], "No speech found", "silent.wav",
                                 "3.0 s")
    assert "no-model" not in line  # the (missing) model was never looked at


# ------------------------------------------------------------------------ valid odd files


@pytest.mark.parametrize("name", FORMATS)
def test_valid_formats_are_read_and_converted(outcomes, name):
    """Silence and a beep: read, resampled and listened to in full, so "no speech" is the
    expected clean outcome (a read or conversion failure would say something else)."""
    assert_one_clean_line(outcomes[f"format_{name}"], "No speech found",
                          f"({FILE_S:.1f} s of audio)")


def test_speech_at_8khz_8bit_gets_a_reply(outcomes):
    if ESPEAK is None:
        pytest.skip("espeak-ng is not installed")
    result = outcomes["speech_8k_8bit"]
    assert result.code == 0, result.stderr[-3000:]
    assert '"event": "turn_finished"' in result.stdout
    assert '"turns": 1' in result.stdout.splitlines()[-1]
    out = outcomes.folder / "speech8k_out.wav"
    info = sf.info(str(out))
    assert (info.samplerate, info.channels) == (24000, 2)
    assert info.duration >= sf.info(str(outcomes.folder / "speech8k.wav")).duration


# ---------------------------------------------------------------------------- long file


@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="needs Linux /proc")
def test_long_file_runs_in_bounded_memory(outcomes):
    short, long = outcomes["long_short"], outcomes["long"]
    for result in (short, long):
        assert_one_clean_line(result, "No speech found")
    assert f"({LONG_FILE_S:.1f} s of audio)" in long.stderr
    growth = long.peak_rss_kb - short.peak_rss_kb
    print(f"\n{LONG_FILE_S / 60:.0f} min of {LONG_RATE} Hz audio: {long.seconds:.1f} s, "
          f"peak RSS {long.peak_rss_kb / 1024:.0f} MiB ({growth / 1024:+.1f} MiB vs "
          f"{SHORT_FILE_S:.0f} s)")
    assert growth < MAX_RSS_GROWTH_KB
