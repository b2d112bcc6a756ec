"""The smart turn policy (session/smart_turn.py): a scripted model first, then the real ONNX model.

Scripted: speech is noise and the VAD a level detector (test_session's LevelVad), so each pause
starts on a known 32 ms window, and the model is a list of probabilities, so each decision is
known. Real: Smart Turn v3.2 through onnxruntime on espeak-ng speech, its features checked
against two references (transformers' Whisper extractor, and pipecat's own numpy code from the
pipecat-ai wheel when pip can fetch it), and replay on a file with both policies.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import threading
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from duplex_chat.audio.constants import SAMPLE_RATE, VAD_WINDOW_SAMPLES, ms_to_samples
from duplex_chat.audio.files import iter_audio_blocks
from duplex_chat.audio.vad import SpeechEnded, SpeechStarted
from duplex_chat.config import DuplexError, load_settings
from duplex_chat.session import Session, VirtualPlayer, make_policy, smart_turn
from duplex_chat.session import events as ev
from duplex_chat.session.policy import SilencePolicy
from duplex_chat.session.smart_turn import (
    MODELED_INFERENCE_S,
    N_FRAMES,
    N_MELS,
    SmartTurnPolicy,
    ThreadedAsker,
    VirtualAsker,
    fit_window,
    smart_turn_features,
)

from .audio_helpers import espeak_speech
from .fake_engine import Reply, ScriptedConversation, chirp
from .test_session import LevelVad, silence, speech

W = VAD_WINDOW_SAMPLES
PAUSE = ms_to_samples(250)  # [turn] pause_ms, default
FALLBACK = ms_to_samples(2500)  # [turn] fallback_ms, default
INFERENCE = round(MODELED_INFERENCE_S * SAMPLE_RATE)
PIPECAT_WHEEL = "pipecat-ai==1.14.0"


class ScriptedModel:
    """P(complete) from a list, one per call (the last repeats); records what it heard and on
    which thread. `gate`, when given, holds every call until it is set."""

    def __init__(self, *probs: float, gate: threading.Event | None = None):
        self.probs, self.gate = list(probs), gate
        self.heard: list[int] = []
        self.threads: list[int] = []

    def prob(self, audio: np.ndarray) -> float:
        self.threads.append(threading.get_ident())
        self.heard.append(len(audio))
        if self.gate is not None:
            self.gate.wait()
        return self.probs[min(len(self.heard), len(self.probs)) - 1]


def smart(model, virtual_clock=True, **turn) -> SmartTurnPolicy:
    settings = load_settings(environ={f"SCA_TURN_{k.upper()}": str(v) for k, v in turn.items()})
    return SmartTurnPolicy(settings.vad, settings.turn, LevelVad(), model,
                           virtual_clock=virtual_clock)


def run(policy, audio: np.ndarray, chunk: int = 160, fed: int = 0) -> list[tuple[int, object]]:
    """Feed in 10 ms chunks; (samples fed when it came, event) for every event."""
    out = []
    for i in range(0, len(audio), chunk):
        piece = audio[i:i + chunk]
        fed += len(piece)
        out += [(fed, e) for e in policy.feed(piece)]
    return out


def ends(events) -> list[tuple[int, SpeechEnded]]:
    return [(at, e) for at, e in events if isinstance(e, SpeechEnded)]


def window_end(sample: int) -> int:
    return -(-sample // W) * W


def chunk_end(sample: int) -> int:
    """The end of the 10 ms chunk that holds `sample`'s predecessor: when a feed first sees it."""
    return -(-sample // 160) * 160


# ---- the policy on a scripted model --------------------------------------------------------
def test_a_complete_turn_ends_after_the_pause_and_the_modelled_inference():
    model = ScriptedModel(0.9)
    policy = smart(model)
    events = run(policy, np.concatenate([silence(0.5), speech(1.0), silence(3.0)]))
    (at, end), = ends(events)
    silence_start = window_end(int(1.5 * SAMPLE_RATE))  # the first window with no speech in it
    assert end.sample_index == silence_start
    asked = chunk_end(silence_start + PAUSE)  # the feed that completes the pause asks
    assert at == chunk_end(asked + INFERENCE)  # the first 10 ms chunk after the modelled time
    assert at - silence_start < 0.45 * SAMPLE_RATE  # vs 0.6 s for the silence policy
    assert (policy.questions_asked, policy.ended_by_model, policy.ended_by_fallback) == (1, 1, 0)
    assert policy.last_prob == 0.9


def test_the_model_hears_the_turn_from_its_pre_roll_to_the_pause():
    model = ScriptedModel(0.9)
    policy = smart(model)
    events = run(policy, np.concatenate([silence(2.0), speech(1.0), silence(1.0)]))
    (_, started), = [(a, e) for a, e in events if isinstance(e, SpeechStarted)]
    silence_start = window_end(3 * SAMPLE_RATE)
    assert model.heard == [chunk_end(silence_start + PAUSE) - started.audio_start_index]


def test_a_long_turn_gives_the_model_its_last_8_seconds():
    model = ScriptedModel(0.9)
    run(smart(model), np.concatenate([speech(10.0), silence(1.0)]))
    assert model.heard == [smart_turn.WINDOW_SAMPLES]


def test_an_incomplete_turn_waits_and_the_fallback_silence_ends_it():
    model = ScriptedModel(0.1)
    policy = smart(model)
    events = run(policy, np.concatenate([speech(1.0), silence(4.0)]))
    (at, end), = ends(events)
    assert end.sample_index == window_end(SAMPLE_RATE)
    assert at == chunk_end(end.sample_index + window_end(FALLBACK))
    assert (policy.questions_asked, policy.ended_by_model, policy.ended_by_fallback) == (1, 0, 1)


def test_a_hesitation_is_one_turn_asked_at_each_pause():
    """Incomplete at the first pause, speech again, complete at the second: one turn, ended at
    the second pause's start."""
    model = ScriptedModel(0.2, 0.95)
    events = run(smart(model), np.concatenate([speech(1.0), silence(0.7), speech(0.8), silence(2.0)]))
    (_, end), = ends(events)
    assert [type(e) for _, e in events] == [SpeechStarted, SpeechEnded]
    assert end.sample_index == window_end(int(2.5 * SAMPLE_RATE))
    assert len(model.heard) == 2


def test_an_answer_that_comes_after_speech_resumed_is_dropped():
    """The pause is long enough to ask (250 ms) but speech resumes before the answer (80 ms
    later): a 'complete' about that pause must not end the turn."""
    model = ScriptedModel(0.99, 0.05)
    policy = smart(model)
    gap = (PAUSE + INFERENCE // 2) / SAMPLE_RATE
    events = run(policy, np.concatenate([speech(1.0), silence(gap), speech(0.5), silence(3.0)]))
    (_, end), = ends(events)
    assert policy.ended_by_fallback == 1 and policy.ended_by_model == 0
    assert end.sample_index > 1.5 * SAMPLE_RATE


def test_threshold_setting_decides():
    for threshold, by_model in ((0.5, 1), (0.7, 0)):
        policy = smart(ScriptedModel(0.6), threshold=threshold)
        run(policy, np.concatenate([speech(1.0), silence(3.0)]))
        assert policy.ended_by_model == by_model


def test_finish_closes_an_open_turn_as_the_silence_policy_does():
    policy = smart(ScriptedModel(0.1))
    run(policy, np.concatenate([speech(1.0), silence(0.5)]))
    (end,) = policy.finish()
    assert end.sample_index == window_end(SAMPLE_RATE)


def test_decisions_on_a_worker_thread_never_block_the_feed():
    """The model is held for as long as the test likes: every feed returns at once, the turn
    stays open, and once the model answers the end of turn comes on a later feed, at the
    pause's start, from the model (long before the fallback)."""
    gate = threading.Event()
    model = ScriptedModel(0.9, gate=gate)
    policy = smart(model, virtual_clock=False)
    try:
        audio = np.concatenate([speech(1.0), silence(1.0)])
        slowest, events = 0.0, []
        for i in range(0, len(audio), 160):
            began = time.perf_counter()
            events += policy.feed(audio[i:i + 160])
            slowest = max(slowest, time.perf_counter() - began)
        assert not [e for e in events if isinstance(e, SpeechEnded)]
        deadline = time.monotonic() + 10.0
        while not model.heard and time.monotonic() < deadline:
            time.sleep(0.005)  # the worker thread takes the question
        assert len(model.heard) == 1 and model.threads[0] != threading.get_ident()
        assert slowest < 0.05  # 10 ms chunks: nothing like a model call
        gate.set()
        deadline = time.monotonic() + 10.0
        while not events[1:] and time.monotonic() < deadline:
            events += policy.feed(silence(0.01))
            time.sleep(0.005)
        assert [type(e) for e in events] == [SpeechStarted, SpeechEnded]
        assert events[1].sample_index == window_end(SAMPLE_RATE)
        assert policy.ended_by_model == 1
    finally:
        gate.set()
        policy.close()


def test_the_fallback_ends_the_turn_while_the_model_is_still_thinking():
    gate = threading.Event()
    policy = smart(ScriptedModel(0.9, gate=gate), virtual_clock=False)
    try:
        events = run(policy, np.concatenate([speech(1.0), silence(3.0)]))
        (at, end), = ends(events)
        assert at == chunk_end(end.sample_index + window_end(FALLBACK))
        assert policy.ended_by_fallback == 1
        gate.set()
        time.sleep(0.05)
        assert run(policy, silence(0.5)) == []  # the late answer is about a turn already over
    finally:
        gate.set()
        policy.close()


def test_a_model_error_is_raised_on_the_feeding_thread():
    class Broken:
        def prob(self, audio):
            raise RuntimeError("model broke")

    asker = ThreadedAsker(Broken())
    asker.ask(1, np.zeros(10, np.float32), 0)
    deadline = time.monotonic() + 5.0
    with pytest.raises(RuntimeError, match="model broke"):
        while time.monotonic() < deadline:
            asker.answers(0)
            time.sleep(0.005)
    asker.close()


def test_virtual_answers_come_after_the_modelled_time_whatever_the_model_costs():
    class Slow:
        def prob(self, audio):
            time.sleep(0.2)
            return 0.7

    asker = VirtualAsker(Slow(), INFERENCE)
    asker.ask(1, np.zeros(10, np.float32), 1000)
    assert asker.answers(1000 + INFERENCE - 1) == []
    assert asker.answers(1000 + INFERENCE) == [(1, 0.7)]


# ---- settings and the session --------------------------------------------------------------
def test_turn_settings_are_validated():
    for environ, words in (({"SCA_TURN_POLICY": "semantic"}, "silence, smart"),
                           ({"SCA_TURN_PAUSE_MS": "10"}, "between 32"),
                           ({"SCA_TURN_THRESHOLD": "1.5"}, "between 0.0 and 1.0"),
                           ({"SCA_TURN_PAUSE_MS": "800", "SCA_TURN_FALLBACK_MS": "700"},
                            "must be longer than turn.pause_ms")):
        with pytest.raises(DuplexError, match=words):
            load_settings(environ=environ)
    assert load_settings(environ={"SCA_TURN_POLICY": "SMART"}).turn.policy == "smart"


def test_make_policy_follows_the_setting(monkeypatch):
    monkeypatch.setattr(smart_turn, "SmartTurnModel", lambda: ScriptedModel(0.9))
    plain = make_policy(load_settings(environ={}), LevelVad())
    assert isinstance(plain, SilencePolicy)
    settings = load_settings(environ={"SCA_TURN_POLICY": "smart"})
    live = make_policy(settings, LevelVad())
    replayed = make_policy(settings, LevelVad(), virtual_clock=True)
    assert isinstance(live.asker, ThreadedAsker) and isinstance(replayed.asker, VirtualAsker)
    live.close()


def session_turn(environ: dict, monkeypatch, threaded: bool = False) -> tuple[ev.UserSpeechEnded, int]:
    """One turn through a Session built from settings alone: its end, and the samples heard when
    the turn was committed."""
    monkeypatch.setattr(smart_turn, "SmartTurnModel", lambda: ScriptedModel(0.9))
    events: list = []
    conversation = ScriptedConversation([Reply(chirp(0.5))], first_packet_s=0.0, realtime_factor=0.0)
    session = Session(load_settings(environ=environ), conversation,
                      VirtualPlayer(lambda: session.now), events.append, vad_model=LevelVad(),
                      threaded=threaded)
    session.start()
    audio = np.concatenate([silence(0.5), speech(1.0), silence(1.5)])
    for i in range(0, len(audio), 160):
        session.hear(audio[i:i + 160])
    session.close()
    (ended,) = [e for e in events if isinstance(e, ev.UserSpeechEnded)]
    (committed,) = [e for e in events if isinstance(e, ev.TurnCommitted)]
    assert committed.end_sample == ended.end_sample
    return ended, committed.sample


def test_the_session_takes_its_policy_from_the_settings(monkeypatch):
    ended, by_silence = session_turn({}, monkeypatch)
    ended_smart, by_model = session_turn({"SCA_TURN_POLICY": "smart"}, monkeypatch)
    assert ended.end_sample == ended_smart.end_sample
    end = ended.end_sample
    assert by_silence == end + window_end(ms_to_samples(600))  # the session cuts at windows
    assert by_model == chunk_end(chunk_end(end + PAUSE) + INFERENCE)


# ---- the real model ------------------------------------------------------------------------
COMPLETE = ("What time is it?", "Could you tell me what the weather will be like tomorrow in Paris?",
            "Thank you very much.")
INCOMPLETE = "So what I was thinking was"


@pytest.fixture(scope="module")
def real_model():
    pytest.importorskip("onnxruntime", reason="onnxruntime is not installed: the smart policy "
                        "cannot run its model")
    return smart_turn.SmartTurnModel()


@pytest.fixture(scope="module")
def pipecat_features(tmp_path_factory):
    """pipecat's own feature code, from the pipecat-ai wheel (fetched by pip, not installed)."""
    folder = tmp_path_factory.mktemp("pipecat")
    result = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d",
                             str(folder), PIPECAT_WHEEL], capture_output=True, text=True,
                            check=False, timeout=120)
    wheels = list(folder.glob("pipecat_ai-*.whl"))
    if result.returncode != 0 or not wheels:
        pytest.skip(f"pip could not fetch {PIPECAT_WHEEL} (no package index?), so the reference "
                    f"feature code is unavailable: {result.stderr.strip()[-200:]}")
    member = "pipecat/audio/turn/smart_turn/_whisper_features.py"
    with zipfile.ZipFile(wheels[0]) as wheel:
        wheel.extract(member, folder)
    spec = importlib.util.spec_from_file_location("pipecat_whisper_features", folder / member)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.compute_whisper_log_mel_features


def turn_audio(text: str, trailing_s: float = 0.26) -> np.ndarray:
    """What the policy sends: 300 ms of pre-roll, the speech, and the pause so far."""
    return np.concatenate([silence(0.3), espeak_speech(text), silence(trailing_s)])


@pytest.mark.parametrize("seconds", [0.5, 3.0, 9.5], ids=["short", "middle", "over-8s"])
def test_features_equal_pipecats_reference(pipecat_features, seconds):
    rng = np.random.default_rng(1)
    speech_like = np.concatenate([espeak_speech(COMPLETE[1])] * 4)[: int(seconds * SAMPLE_RATE)]
    audio = speech_like + 0.001 * rng.standard_normal(len(speech_like)).astype(np.float32)
    ours = smart_turn_features(audio)
    assert ours.shape == (N_MELS, N_FRAMES) and ours.dtype == np.float32
    np.testing.assert_allclose(ours, pipecat_features(fit_window(audio)), atol=1e-5, rtol=0)


def test_features_equal_transformers_whisper_extractor():
    from transformers import WhisperFeatureExtractor

    extractor = WhisperFeatureExtractor(feature_size=N_MELS, chunk_length=8)
    audio = turn_audio(COMPLETE[0])
    reference = extractor(fit_window(audio), sampling_rate=SAMPLE_RATE, padding="max_length",
                          max_length=smart_turn.WINDOW_SAMPLES, truncation=True,
                          do_normalize=True, return_tensors="np").input_features[0]
    np.testing.assert_allclose(smart_turn_features(audio), reference, atol=1e-4, rtol=0)


def test_the_packaged_model_is_the_pipecat_file():
    import hashlib

    path = smart_turn.model_path()
    assert hashlib.sha256(path.read_bytes()).hexdigest() == smart_turn.MODEL_SHA256
    assert "BSD 2-Clause" in (path.parent / "smart-turn-LICENSE.txt").read_text()


def test_a_damaged_model_file_is_refused(tmp_path):
    bad = tmp_path / smart_turn.MODEL_FILE
    bad.write_bytes(b"not a model")
    with pytest.raises(DuplexError, match="damaged"):
        smart_turn.SmartTurnModel(bad)


def test_a_complete_sentence_scores_higher_than_an_incomplete_start(real_model):
    complete = [real_model.prob(turn_audio(text)) for text in COMPLETE]
    incomplete = real_model.prob(turn_audio(INCOMPLETE))
    assert min(complete) > 0.5 > incomplete
    assert min(complete) > incomplete + 0.4


def replay_file(path: Path, environ: dict):
    import io

    from rich.console import Console

    from duplex_chat.cli.replay import Printer, ReplaySession, ReplyTimeline

    conversation = ScriptedConversation([Reply(chirp(0.5))], first_packet_s=0.0, realtime_factor=0.0)
    session = ReplaySession(load_settings(environ=environ), lambda: conversation,
                            Printer(Console(file=io.StringIO())), ReplyTimeline(None))
    chunk = 5120  # replay's 320 ms chunks
    for block in iter_audio_blocks(path):
        for i in range(0, len(block), chunk):
            session.process(block[i:i + chunk])
    session.finish()
    return session.records


def test_replay_with_the_smart_policy_ends_complete_sentences_sooner(real_model, tmp_path):
    """Silero VAD and the real model on a file of three complete questions, 3 s apart: the same
    turns, each decided sooner than 600 ms of silence decides it."""
    parts = [silence(0.5)]
    for text in COMPLETE:
        parts += [espeak_speech(text), silence(3.0)]
    path = tmp_path / "questions.wav"
    sf.write(str(path), np.concatenate(parts), SAMPLE_RATE, subtype="PCM_16")
    by_silence = replay_file(path, {})
    by_model = replay_file(path, {"SCA_TURN_POLICY": "smart"})
    assert len(by_silence) == len(by_model) == len(COMPLETE)
    for slow, fast in zip(by_silence, by_model):
        assert fast.end_of_speech_s == pytest.approx(slow.end_of_speech_s, abs=0.04)
        assert (fast.turn_decided_s - fast.end_of_speech_s < 0.45
                < slow.turn_decided_s - slow.end_of_speech_s)
