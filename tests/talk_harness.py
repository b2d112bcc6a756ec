"""Drive a real `talk` session through the virtual devices (tests/virtual_audio.py).

`run_conversation` starts `talk_session` on a thread with a scripted Conversation, then plays a
"user" script (24 kHz) into the virtual microphone while recording the virtual speaker, on one
duplex test stream so both share a clock (`ScriptStream`, which tests of a `talk` process use
too). With `echo_gain` the recorded speaker signal is mixed
back into the microphone (an acoustic echo, delayed by ECHO_DELAY_SAMPLES and the loopback itself).
"""

from __future__ import annotations

import json
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf

from duplex_chat.audio.resample import resample
from duplex_chat.config import load_settings

TEST_RATE = 24_000  # Hz of the test's own stream
SESSION_START_TIMEOUT_S = 20.0
# The test's own stream meets the same start-up failure of ALSA's pulse plugin as the app's
# (audio/stream.py START_ATTEMPTS): it may stop within milliseconds of starting; reopen it.
TEST_STREAM_ATTEMPTS = 3
TEST_STREAM_SETTLE_S = 0.25
# PortAudio's "high" latency (35 ms here). With "low" (9 ms) the stream underran on a busy
# machine: it stopped, or the simulated echo drifted to 0.5-0.7 s late in mid-reply.
TEST_STREAM_LATENCY = "high"
SCRIPT_MARGIN_S = 10.0  # the script must have played by its length plus this
# The simulated echo repeats what the speaker played this much later, on top of the loopback's own
# lag. It used to repeat "the previous block", whose length PortAudio varies after an underrun:
# the echo then jumped back and forth in time, which no echo canceller follows.
ECHO_DELAY_SAMPLES = int(0.02 * TEST_RATE)
MIN_MATCH = 0.8  # normalised correlation of a reply found in a recording
PIECE_S = 0.25  # assert_heard looks for the reply piece by piece
MAX_SLIP_S = 0.1  # how much later than continuous playback the reply's end may come


def espeak(text: str, voice: str = "en", gain: float = 0.8) -> np.ndarray:
    """Speech (n,) float32 at 24 kHz from espeak-ng, trimmed of its leading/trailing silence."""
    with tempfile.NamedTemporaryFile(suffix=".wav") as f:
        subprocess.run(["espeak-ng", "-v", voice, "-w", f.name, text], check=True, capture_output=True)
        audio, rate = sf.read(f.name, dtype="float32")
    audio = resample(audio, rate, TEST_RATE)
    loud = np.flatnonzero(np.abs(audio) > 0.01)
    audio = audio[loud[0]:loud[-1] + 1]
    return (gain * audio / np.max(np.abs(audio))).astype(np.float32)


def session_settings(record_dir: Path, **overrides):
    base = {"audio.input_device": "virtmic", "audio.output_device": "virtspk", "ui.plain": True,
            "ui.record_dir": str(record_dir)}
    base.update(overrides)
    return load_settings(overrides=base, environ={})


@dataclass
class Result:
    recorded: np.ndarray  # what the virtual speaker played, test timeline, 24 kHz
    log: list[dict]  # the session's JSONL
    record_dir: Path
    error: BaseException | None
    loopback_s: float = 0.0  # the test stream's own latencies, in + out: what talk cannot see


    def events(self, kind: str) -> list[dict]:
        return [e for e in self.log if e["type"] == kind]


def read_log(record_dir: Path) -> list[dict]:
    logs = sorted(Path(record_dir).glob("*-events.jsonl"))
    if not logs:
        return []
    return [json.loads(line) for line in logs[-1].read_text().splitlines() if line.strip()]


def _wait_started(record_dir: Path, thread: threading.Thread) -> None:
    deadline = time.monotonic() + SESSION_START_TIMEOUT_S
    while time.monotonic() < deadline and thread.is_alive():
        if any(e["type"] == "session_started" for e in read_log(record_dir)):
            return
        time.sleep(0.05)
    raise AssertionError("talk session did not start")


class ScriptStream:
    """The test's own duplex stream, while inside: plays `script` (24 kHz) into the virtual
    microphone and records the virtual speaker on the same clock (the callback's sample count),
    into `recorded`. With `echo_gain` what the speaker played is mixed back into the microphone
    ECHO_DELAY_SAMPLES later, on top of the loopback's own lag (an acoustic echo).
    `loopback_s`: the stream's own reported latencies, in + out, part of every latency measured
    through it."""

    def __init__(self, script: np.ndarray, echo_gain: float = 0.0):
        self.script, self.echo_gain = script, echo_gain
        self.recorded = np.zeros(len(script), np.float32)
        self.pos = 0  # script samples played (the callback's thread writes it)
        self.loopback_s = 0.0
        self._stream = None

    def __enter__(self) -> "ScriptStream":
        import sounddevice as sd

        self._stream = _open_test_stream(sd, self._callback, self._rewind)
        self.loopback_s = sum(self._stream.latency)
        return self

    def __exit__(self, *exc) -> None:
        self._stream.close()

    @property
    def played_s(self) -> float:
        return self.pos / TEST_RATE

    @property
    def done(self) -> bool:
        return self.pos >= len(self.script)

    @property
    def active(self) -> bool:
        return self._stream.active

    def _callback(self, indata, outdata, frames, time_info, status) -> None:
        p, script, recorded = self.pos, self.script, self.recorded
        n = max(0, min(frames, len(script) - p))
        recorded[p:p + n] = indata[:n, 0]
        outdata[:] = 0
        outdata[:n, 0] = script[p:p + n]
        # the echo: a fixed delay whatever the block size (PortAudio's vary after an underrun)
        if self.echo_gain:
            d = ECHO_DELAY_SAMPLES
            first = min(n, max(0, d - p))  # nothing recorded yet to repeat
            outdata[first:n, 0] += self.echo_gain * recorded[p + first - d:p + n - d]
        self.pos = p + frames

    def _rewind(self) -> None:  # a failed start may have run a few callbacks
        self.pos = 0
        self.recorded[:] = 0.0


def run_conversation(settings, conversation_factory, script: np.ndarray, echo_gain: float = 0.0,
                     console=None, tail_s: float = 0.0, during=None) -> Result:
    """Play `script` (24 kHz) as the user; return what the speaker played and the session log.

    `during(session_thread)` runs after the script started (e.g. to unplug a device).
    """
    from duplex_chat.cli.talk import talk_session

    stop = threading.Event()
    error: list[BaseException] = []

    def target() -> None:
        try:
            talk_session(settings, conversation_factory, console=console, stop=stop)
        except BaseException as exc:  # reported to the test
            error.append(exc)

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    record_dir = Path(settings.ui.record_dir)
    _wait_started(record_dir, thread)
    script = np.concatenate([script, np.zeros(int(tail_s * TEST_RATE), np.float32)])
    with ScriptStream(script, echo_gain) as player:
        if during is not None:
            during(thread)
        deadline = time.monotonic() + len(script) / TEST_RATE + SCRIPT_MARGIN_S
        while not player.done and thread.is_alive():
            if not player.active or time.monotonic() > deadline:
                stop.set()
                raise AssertionError(
                    f"the test's own audio stream stopped at {player.played_s:.2f} s")
            time.sleep(0.02)
    stop.set()
    thread.join(15)
    assert not thread.is_alive(), "talk session did not stop"
    return Result(player.recorded, read_log(record_dir), record_dir, error[0] if error else None,
                  player.loopback_s)


def _open_test_stream(sd, callback, rewind):
    """The test's duplex stream (speaker monitor in, microphone feed out), started and settled;
    `rewind()` restarts the script before each new attempt."""
    for _ in range(TEST_STREAM_ATTEMPTS):
        rewind()
        stream = sd.Stream(device=("virtspk_mon", "mic_feed"), samplerate=TEST_RATE, channels=1,
                           callback=callback, latency=TEST_STREAM_LATENCY)
        stream.start()
        time.sleep(TEST_STREAM_SETTLE_S)
        if stream.active:
            return stream
        stream.close()
    raise AssertionError(f"the test's audio stream stopped right after starting, {TEST_STREAM_ATTEMPTS} times")


def find_signal(recording: np.ndarray, reference: np.ndarray) -> tuple[int, float]:
    """(offset, normalised correlation) of `reference` in `recording` (both 24 kHz)."""
    ref = reference[: min(len(reference), TEST_RATE)]
    n = len(recording) + len(ref)
    size = 1 << (n - 1).bit_length()
    corr = np.fft.irfft(np.fft.rfft(recording, size) * np.conj(np.fft.rfft(ref, size)), size)
    corr = corr[: len(recording) - len(ref) + 1]
    k = int(np.argmax(corr))
    energy = np.sqrt(np.sum(ref ** 2) * np.sum(recording[k:k + len(ref)] ** 2)) + 1e-12
    return k, float(corr[k] / energy)


def assert_heard(recording: np.ndarray, reply: np.ndarray) -> tuple[int, float]:
    """Assert that `reply` plays in `recording` (both 24 kHz); return (its offset, its slip in s).

    The reply is looked for piece by piece (PIECE_S), and each piece must match. A callback of
    either stream late by more than its buffer puts a few ms of silence into the loop (seen with
    one core busy: one 9 ms gap in 12 runs); the rest then arrives that much later. So pieces may
    slip, in order and by at most MAX_SLIP_S in all, but never be missing or early.
    """
    piece = int(PIECE_S * TEST_RATE)
    found = [find_signal(recording, reply[k:k + piece]) for k in range(0, len(reply), piece)]
    assert min(m for _, m in found) > MIN_MATCH, f"reply not heard on the speaker: {found}"
    offset = found[0][0]
    slips = [(o - offset) / TEST_RATE - k * PIECE_S for k, (o, _) in enumerate(found)]
    in_order = all(b > a - 0.001 for a, b in zip(slips, slips[1:]))  # 1 ms: peak-picking jitter
    assert in_order and slips[-1] < MAX_SLIP_S, f"reply pieces slipped by {slips} s"
    return offset, slips[-1]
