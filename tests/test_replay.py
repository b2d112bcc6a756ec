"""`duplex-chat replay` end to end on the tiny random checkpoint with espeak speech.

Replies of a random model never end by themselves, so every run caps them (REPLY_CAPS). Timing
checks are relative to the run's own measured stages, not to absolute numbers: CI machines are
slow and shared.
"""

from __future__ import annotations

import json
import os
import pty
import select
import signal
import subprocess
import time

import numpy as np
import pytest
import soundfile as sf
import soxr
from typer.testing import CliRunner

from duplex_chat.cli.app import app
from duplex_chat.session import MODELED_FIRST_PACKET_S

from .audio_helpers import requires_espeak, sentences_with_pauses
from .terminal_screen import Screen
from .test_bad_input import CLI
from .test_wav_writer import SOX, declared_samples, sox_samples

pytestmark = requires_espeak

RATE = 16_000
OUT_RATE = 24_000
SENTENCES = ["Hello there, how are you doing today?", "What will the weather be like tomorrow?"]
PAUSE_S = 2.0  # silence between the sentences
LEAD_S = 1.0  # silence before the first (and after the last) sentence
REPLY_CAPS = {"SCA_QWEN_MAX_REPLY_TOKENS": "6", "SCA_QWEN_MAX_REPLY_SECONDS": "0.8",
              "SCA_QWEN_GREEDY": "true"}
MAX_REPLY_S = 0.8 + 0.08  # the cap plus one codec frame
EDGE_TOLERANCE_S = 0.35  # VAD vs energy edges of espeak speech
STAGES = ("first_token", "first_packet", "thinker_ms_per_token", "talker_ms_per_frame")
ONSET_SAMPLES = int(0.05 * OUT_RATE)  # a reply must sound within 50 ms of its start


def model_args(checkpoint) -> list[str]:
    return ["--model", str(checkpoint), "--device-map", "cpu", "--dtype", "float32"]


def json_lines(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def invoke(args: list[str]):
    """Run the app in this process (faster than a subprocess) with capped replies."""
    return CliRunner().invoke(app, args, env=REPLY_CAPS, catch_exceptions=False)


@pytest.fixture(scope="module")
def two_sentences(tmp_path_factory):
    """A PCM16 wav of two sentences, and each sentence's true (start, end) in seconds."""
    audio, edges = sentences_with_pauses(SENTENCES, PAUSE_S, RATE, LEAD_S)
    path = tmp_path_factory.mktemp("replay") / "two.wav"
    sf.write(str(path), audio, RATE, subtype="PCM_16")
    return path, [(a / RATE, b / RATE) for a, b in edges]


@pytest.fixture(scope="module")
def json_run(two_sentences, tiny_checkpoint, tmp_path_factory):
    """`duplex-chat replay FILE --out OUT --json` as a real subprocess."""
    path, _ = two_sentences
    out = tmp_path_factory.mktemp("replay-out") / "reply.wav"
    env = {**os.environ, **REPLY_CAPS}
    cmd = [*CLI, "replay", str(path), "--out", str(out), "--json", *model_args(tiny_checkpoint)]
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return json_lines(result.stdout), out


def finished_turns(events: list[dict]) -> list[dict]:
    return [e for e in events if e["event"] == "turn_finished"]


def test_json_has_two_turns_with_stages(json_run, two_sentences):
    events, _ = json_run
    _, edges = two_sentences
    started = [e for e in events if e["event"] == "turn_started"]
    finished = finished_turns(events)
    assert [e["turn"] for e in started] == [0, 1] and [e["turn"] for e in finished] == [0, 1]
    assert events[-1]["event"] == "summary" and events[-1]["turns"] == 2
    for turn, (true_start, true_end) in zip(started, edges):
        assert turn["start_s"] < true_start  # pre-roll keeps the onset
        assert abs(turn["end_of_speech_s"] - true_end) < EDGE_TOLERANCE_S
        # The turn is known to be over end_of_turn_ms (600) + at most one chunk later.
        assert 0.5 <= turn["turn_decided_s"] - turn["end_of_speech_s"] <= 1.3
    for turn in finished:
        assert turn["text"].strip(), "the capped reply has tokens"
        assert set(STAGES) <= set(turn["stages"])
        assert turn["stages"]["first_token"] <= turn["stages"]["first_packet"]
        assert 0 < turn["reply_s"] <= MAX_REPLY_S
    texts = "".join(e["text"] for e in events if e["event"] == "text")
    assert texts == "".join(t["text"] for t in finished)


def test_reply_starts_right_after_the_turn(json_run):
    """On replay's virtual clock a reply sounds the modelled first-packet time after its end of
    turn was decided, however long this machine took to compute it. No reply queued here, so
    both latencies are the same: the decision plus the first packet."""
    events, _ = json_run
    started = [e for e in events if e["event"] == "turn_started"]
    for turn, done in zip(started, finished_turns(events)):
        for key in ("end_of_speech_s", "turn_decided_s", "reply_requested_s"):
            assert done[key] == turn[key]
        assert done["reply_requested_s"] == done["turn_decided_s"]
        packet = done["first_packet_ready_s"] - done["reply_requested_s"]
        assert packet == pytest.approx(MODELED_FIRST_PACKET_S, abs=1 / OUT_RATE)
        # The 24 kHz start, seen on the 16 kHz clock: the next input sample at or after it.
        assert 0 <= done["reply_start_s"] - done["first_packet_ready_s"] < 1 / RATE
        decided = done["turn_decided_s"] - done["end_of_speech_s"]
        assert done["ready_latency_s"] == pytest.approx(decided + packet, abs=1e-6)
        heard = done["reply_start_s"] - done["end_of_speech_s"]
        assert done["heard_latency_s"] == pytest.approx(heard, abs=1e-6)
        assert done["first_packet_timing"] == "modelled"
        assert done["interrupted_s"] is None  # the pauses are longer than the capped replies


def test_out_wav_is_input_left_and_replies_right(json_run, two_sentences):
    events, out = json_run
    info = sf.info(str(out))
    assert (info.samplerate, info.channels) == (OUT_RATE, 2)
    stereo, _ = sf.read(str(out), dtype="float64")
    source, _ = sf.read(str(two_sentences[0]), dtype="float64")
    reference = soxr.resample(source, RATE, OUT_RATE)
    left, right = stereo[:, 0], stereo[:, 1]
    assert len(left) >= len(reference)
    assert np.corrcoef(left[: len(reference)], reference)[0, 1] > 0.999
    # The right channel is silent until the first reply and sounds from each reply_start_s on.
    # Later packets sit where they were ready, so a slow machine leaves gaps: only the start of
    # each reply and the total amount of sound are exact. (The tiny model's audio is a few LSB
    # in PCM16, hence "non-zero" rather than a level.)
    turns = finished_turns(events)
    starts = [round(t["reply_start_s"] * OUT_RATE) for t in turns]
    assert starts[0] > round(events[0]["turn_decided_s"] * OUT_RATE)
    assert not np.any(right[:starts[0]])
    for start in starts:
        assert np.any(right[start:start + ONSET_SAMPLES])
    assert np.count_nonzero(right) <= sum(round(t["reply_s"] * OUT_RATE) for t in turns)
    assert len(right) >= starts[-1] + round(turns[-1]["reply_s"] * OUT_RATE)


def test_human_output_with_voice_chelsie(two_sentences, tiny_checkpoint, json_run, monkeypatch):
    """No --json: user/assistant lines and timing lines per turn; --voice reaches the engine."""
    from duplex_chat.model import engine

    speakers = []
    original_init = engine.StreamingConversation.__init__

    def spying_init(self, *args, **kwargs):
        original_init(self, *args, **kwargs)
        speakers.append((self.q.voice, self.speaker_id))

    monkeypatch.setattr(engine.StreamingConversation, "__init__", spying_init)
    result = invoke(["replay", str(two_sentences[0]), "--voice", "chelsie",
                     *model_args(tiny_checkpoint)])
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert sum(line.startswith("user ") for line in lines) == 2
    assert sum(line.startswith("assistant ") for line in lines) == 2
    assert result.stdout.count("reply ready") == 2 and result.stdout.count("on this machine") == 2
    assert "turns (file time" in result.stdout  # the table of every turn at the end
    assert "2 turn(s)" in result.stdout
    assert speakers == [("Chelsie", 2301)]  # the release config's id for chelsie
    # The voice changes the talker only: greedy text equals the --json run's (voice Ethan).
    for turn in finished_turns(json_run[0]):
        assert turn["text"].strip() in result.stdout


def test_stock_generate_one_turn(tiny_checkpoint, tmp_path):
    audio, _ = sentences_with_pauses(SENTENCES[:1], PAUSE_S, RATE, lead_s=0.5)
    path = tmp_path / "one.wav"
    sf.write(str(path), audio, RATE, subtype="PCM_16")
    out = tmp_path / "stock.wav"
    result = invoke(["replay", str(path), "--stock", "--json", "--out", str(out),
                     *model_args(tiny_checkpoint)])
    assert result.exit_code == 0, result.output
    events = json_lines(result.stdout)
    (turn,) = finished_turns(events)
    assert turn["text"].strip() and 0 < turn["reply_s"] <= MAX_REPLY_S
    assert turn["reply_start_s"] >= events[0]["turn_decided_s"]
    assert sf.info(str(out)).channels == 2


# ---- a user who talks over the reply ------------------------------------------------------------
# Replies of 2 s and more tokens than frames: the text runs ahead of the speech, so a cut is seen
# in the text too. The second sentence starts BARGE_PAUSE_S after the first ends, while the first
# reply plays (it sounds from about 0.7 s after the end of speech: 600 ms of silence, the VAD's
# window and the modelled first packet).
BARGE_CAPS = {"SCA_QWEN_MAX_REPLY_TOKENS": "40", "SCA_QWEN_MAX_REPLY_SECONDS": "2.0",
              "SCA_QWEN_GREEDY": "true"}
BARGE_PAUSE_S = 1.3
BARGE_IN_WITHIN_S = 0.25  # VAD onset vs energy onset of espeak speech, plus the 64 ms fast path


@pytest.fixture(scope="module")
def talked_over(tmp_path_factory):
    audio, edges = sentences_with_pauses(SENTENCES, BARGE_PAUSE_S, RATE, LEAD_S)
    path = tmp_path_factory.mktemp("barge") / "over.wav"
    sf.write(str(path), audio, RATE, subtype="PCM_16")
    return path, [(a / RATE, b / RATE) for a, b in edges]


def _replay_json(path, checkpoint, out) -> list[dict]:
    args = ["replay", str(path), "--json", "--out", str(out), *model_args(checkpoint)]
    result = CliRunner().invoke(app, args, env=BARGE_CAPS, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return json_lines(result.stdout)


def test_talking_over_the_reply_cuts_it_deterministically(talked_over, tiny_checkpoint, tmp_path):
    path, edges = talked_over
    runs = [_replay_json(path, tiny_checkpoint, tmp_path / f"{k}.wav") for k in range(2)]
    first, second = finished_turns(runs[0])
    # The first reply was cut where the second sentence began, and only what was heard is kept.
    assert first["interrupted_s"] is not None and second["interrupted_s"] is None
    assert edges[1][0] <= first["interrupted_s"] <= edges[1][0] + BARGE_IN_WITHIN_S
    heard_s = first["interrupted_s"] - first["reply_start_s"]
    assert first["reply_s"] == pytest.approx(heard_s, abs=2 / OUT_RATE)
    assert first["heard_text"].strip() and first["text"].startswith(first["heard_text"])
    assert len(first["heard_text"]) < len(first["text"])
    # The new turn keeps the speech that interrupted (its pre-roll reaches before the onset).
    started = [e for e in runs[0] if e["event"] == "turn_started"]
    assert started[1]["start_s"] < edges[1][0] < started[1]["end_of_speech_s"]
    # Nothing of the first reply sounds after the barge-in, until the second reply.
    stereo, _ = sf.read(str(tmp_path / "0.wav"), dtype="float64")
    cut, resume = (round(t * OUT_RATE) for t in (first["interrupted_s"], second["reply_start_s"]))
    assert np.any(stereo[cut - ONSET_SAMPLES:cut, 1]) and not np.any(stereo[cut + 1:resume, 1])
    # The virtual clock: the same timeline and the same words on every run.
    def timeline(events):
        return [{k: v for k, v in e.items() if k not in ("stages", "seconds", "out")} for e in events]

    assert timeline(runs[0]) == timeline(runs[1])
    assert np.array_equal(stereo, sf.read(str(tmp_path / "1.wav"), dtype="float64")[0])


# ---- stopped early: SIGTERM as Ctrl-C ------------------------------------------------------------
STOP_SENTENCES = SENTENCES * 4  # 8 turns: the signal comes after the first, long before the end
SUBPROCESS_TIMEOUT_S = 300


@pytest.fixture(scope="module")
def eight_sentences(tmp_path_factory):
    audio, _ = sentences_with_pauses(STOP_SENTENCES, PAUSE_S, RATE, LEAD_S)
    path = tmp_path_factory.mktemp("stop") / "eight.wav"
    sf.write(str(path), audio, RATE, subtype="PCM_16")
    return path, len(audio) / RATE


@pytest.mark.parametrize("signum,at", [(signal.SIGTERM, "turn_finished"),
                                        (signal.SIGINT, "turn_finished"),
                                        (signal.SIGTERM, "turn_started")],
                         ids=["SIGTERM", "SIGINT", "SIGTERM-while-replying"])
def test_a_signal_stops_the_replay_with_its_file_finished_and_a_summary(
        eight_sentences, tiny_checkpoint, tmp_path, signum, at):
    """SIGTERM does what Ctrl-C (SIGINT) does: the --out wav is finished up to where the replay
    was, the summary says where and why it stopped, and the exit code is 128 + the signal. Sent
    at "turn_started", it lands while the model writes the reply, in the middle of a chunk: the
    reply in flight is reported with nothing heard, and the wav still ends where the replay did."""
    path, duration_s = eight_sentences
    out = tmp_path / "stopped.wav"
    env = {**os.environ, **REPLY_CAPS}
    cmd = [*CLI, "replay", str(path), "--out", str(out), "--json", *model_args(tiny_checkpoint)]
    child = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             env=env)
    lines = []
    try:
        for line in child.stdout:  # streamed: each line is flushed as it happens
            lines.append(json.loads(line))
            if lines[-1]["event"] == at:
                child.send_signal(signum)
                break
        rest, stderr = child.communicate(timeout=SUBPROCESS_TIMEOUT_S)
    finally:
        child.kill()
    assert child.returncode == 128 + signum, stderr[-3000:]
    assert "Traceback" not in stderr
    events = lines + json_lines(rest)
    summary = events[-1]
    assert summary["event"] == "summary" and summary["stopped"] == signal.Signals(signum).name
    (first, *_) = finished_turns(events)  # the turn in flight is reported too
    assert 1 <= summary["turns"] < len(STOP_SENTENCES)
    stopped_at = summary["stopped_at_s"]
    assert first["turn_decided_s"] <= stopped_at < duration_s
    if first["reply_start_s"] is None:  # stopped before it sounded
        assert first["reply_s"] == 0
    else:  # heard from its start, up to the stop at most
        assert 0 < first["reply_s"] <= stopped_at - first["reply_start_s"] + 1 / OUT_RATE
    # The wav ends where the replay stopped, and its header counts every frame written.
    frames = sf.info(str(out)).frames
    assert declared_samples(out) == 2 * frames
    if SOX is not None:
        assert sox_samples(out) == 2 * frames
    assert frames == round(stopped_at * OUT_RATE)
    stereo, _ = sf.read(str(out), dtype="float64")
    source, _ = sf.read(str(path), dtype="float64")
    reference = soxr.resample(source, RATE, OUT_RATE)[:frames]
    assert np.corrcoef(stereo[:, 0], reference)[0, 1] > 0.999  # the input, without a gap
    if first["reply_start_s"] is not None:
        start = round(first["reply_start_s"] * OUT_RATE)
        assert np.any(stereo[start:start + ONSET_SAMPLES, 1])  # the first reply is in it


# ---- on a terminal: a long file's progress bar and the text -------------------------------------
TERMINAL_WIDTH = 120
LONG_PAUSE_S = 25.0  # two sentences this far apart: a file over a minute, for the bar


@pytest.fixture(scope="module")
def long_file(tmp_path_factory):
    audio, _ = sentences_with_pauses(SENTENCES, LONG_PAUSE_S, RATE, lead_s=LONG_PAUSE_S)
    assert len(audio) / RATE > 60  # past PROGRESS_MIN_S
    path = tmp_path_factory.mktemp("long") / "long.wav"
    sf.write(str(path), audio, RATE, subtype="PCM_16")
    return path


def run_on_terminal(cmd, stdout_on_terminal: bool) -> tuple[str, str, int]:
    """Run `cmd` with stderr (and stdout, if asked) on a pseudo-terminal; returns what the
    terminal got, what the stdout pipe got (if not on the terminal) and the exit code."""
    master, slave = pty.openpty()
    env = {**os.environ, **REPLY_CAPS, "COLUMNS": str(TERMINAL_WIDTH), "TERM": "xterm"}
    out = slave if stdout_on_terminal else subprocess.PIPE
    child = subprocess.Popen(cmd, stdin=slave, stdout=out, stderr=slave, env=env)
    os.close(slave)
    got = {master: b""} if stdout_on_terminal else {master: b"", child.stdout.fileno(): b""}
    open_fds, deadline = set(got), time.monotonic() + SUBPROCESS_TIMEOUT_S
    while open_fds and time.monotonic() < deadline:
        ready, _, _ = select.select(list(open_fds), [], [], 0.5)
        for fd in ready:
            try:
                data = os.read(fd, 65536)
            except OSError:  # EIO: the terminal's last writer is gone
                data = b""
            if data:
                got[fd] += data
            else:
                open_fds.discard(fd)
    child.kill()
    child.wait()
    os.close(master)
    piped = b"" if stdout_on_terminal else got[child.stdout.fileno()]
    return got[master].decode(), piped.decode(), child.returncode


def test_on_a_terminal_a_long_files_bar_never_overwrites_the_replies(long_file, tiny_checkpoint):
    """stdout and stderr on one terminal (the usual case): the screen, replayed by an emulator,
    has every user line, every reply whole on its assistant line and every timing line, in order;
    the bar was drawn meanwhile and is gone at the end."""
    cmd = [*CLI, "replay", str(long_file), *model_args(tiny_checkpoint)]
    raw, _, code = run_on_terminal(cmd, stdout_on_terminal=True)
    assert code == 0, raw[-3000:]
    assert raw.count("listening") > 2  # the bar was drawn, and redrawn
    screen = Screen(TERMINAL_WIDTH)
    screen.feed(raw)
    lines = screen.lines()
    assert not any("listening" in line for line in lines)
    users = [i for i, line in enumerate(lines) if line.startswith("user ")]
    assert len(users) == 2
    for i in users:
        assert lines[i + 1].startswith("assistant ") and len(lines[i + 1]) > len("assistant ")
        assert lines[i + 2].startswith("  reply ready ")
        assert lines[i + 3].startswith("  heard from ")
    assert "2 turn(s)" in lines[-1]


def test_json_to_a_pipe_stays_raw_while_the_bar_is_on_the_terminal(long_file, tiny_checkpoint):
    """--json with stdout piped and stderr on a terminal: the bar shows on stderr, and every
    JSON line reaches stdout whole (before, the bar's redirection printed them on stderr)."""
    cmd = [*CLI, "replay", str(long_file), "--json", *model_args(tiny_checkpoint)]
    raw, piped, code = run_on_terminal(cmd, stdout_on_terminal=False)
    assert code == 0, raw[-3000:]
    assert "listening" in raw and '"event"' not in raw
    events = json_lines(piped)
    assert [e["event"] for e in events].count("turn_finished") == 2
    assert events[-1]["event"] == "summary"
