"""`talk` end to end through real PortAudio streams on PulseAudio null sinks (no sound card).

Latencies measured here include the virtual loopback itself (160-400 ms each way, see the shared
notes), so they bound the app's own latency from above; each test prints what it measured.
"""

from __future__ import annotations

import numpy as np
import pytest
import soundfile as sf

from duplex_chat.cli.talk import LOOP_PERIOD_S

from .fake_engine import Reply, ScriptedConversation, chirp, factory_for
from .talk_harness import (
    MIN_MATCH,
    TEST_RATE,
    assert_heard,
    espeak,
    find_signal,
    run_conversation,
    session_settings,
)
from .virtual_audio import virtual_audio_or_skip

pytestmark = pytest.mark.audio_devices

BARGE_IN_BOUND_MS = 150.0


@pytest.fixture(scope="module")
def vaudio():
    with virtual_audio_or_skip() as devices:
        yield devices


def silence(seconds: float) -> np.ndarray:
    return np.zeros(int(seconds * TEST_RATE), np.float32)


def test_speech_gets_reply_with_measured_latency(vaudio, tmp_path):
    speech = espeak("Hello there, what is the weather like today?")
    reply = chirp(1.5)
    conversation = ScriptedConversation([Reply(reply, ("Sunny", "and", "warm."))])
    script = np.concatenate([silence(0.5), speech, silence(3.0)])
    result = run_conversation(session_settings(tmp_path), factory_for(conversation), script)

    assert result.error is None
    assert len(conversation.called("end_turn")) == 1
    fed = sum(n for _, n in conversation.called("feed"))
    assert fed >= 0.9 * len(speech) * 16_000 / TEST_RATE  # the whole utterance reached the model
    offset, slip = assert_heard(result.recorded, reply)
    speech_end = 0.5 + len(speech) / TEST_RATE
    heard_latency = offset / TEST_RATE - speech_end
    app_latency = result.events("reply_latency")[0]["latency_ms"]
    print(f"\nlatency: {1000 * heard_latency:.0f} ms through the virtual loopback "
          f"(mic path + VAD end-of-turn {600} ms + engine + speaker path); "
          f"app-measured {app_latency:.0f} ms; the loopback's streams "
          f"{1000 * result.loopback_s:.0f} ms; playback slipped {1000 * slip:.0f} ms "
          f"({result.events('session_ended')[0]['output_underflows']} output underflows)")
    assert 0.6 < heard_latency < 2.5
    assert 600 < app_latency < 1500
    # What the view tells is what the speaker does, once the test's own stream latencies (the
    # script reaching the microphone, the speaker reaching the test) are taken off.
    assert abs(1000 * (heard_latency - result.loopback_s) - app_latency) < 250
    turn = result.events("turn_finished")[0]
    assert turn["text"] == "Sunny and warm."
    mic = sf.read(next(result.record_dir.glob("*-mic.wav")))[0]
    assistant, rate = sf.read(next(result.record_dir.glob("*-assistant.wav")))
    assert rate == 24_000 and abs(len(mic) / 16_000 - len(assistant) / 24_000) < 0.2
    assert find_signal(assistant.astype(np.float32), reply)[1] > MIN_MATCH


def test_barge_in_stops_playback_and_starts_new_turn(vaudio, tmp_path):
    first = espeak("Tell me a long story please.")
    second = espeak("Stop, stop, wait a moment.", voice="en+f3")
    long_reply = chirp(8.0)
    # Real time factor 0.9: the reply is still being generated when the user interrupts.
    conversation = ScriptedConversation([Reply(long_reply), Reply(chirp(1.0))], realtime_factor=0.9)
    script = np.concatenate([silence(0.3), first, silence(2.5), second, silence(3.0)])
    result = run_conversation(session_settings(tmp_path), factory_for(conversation), script)

    assert result.error is None
    cancels = conversation.called("cancel")
    assert len(cancels) >= 1
    barge = result.events("barge_in")[0]
    # ...and the history is cut to what was heard even if the reply had finished generating:
    # truncate, with the same heard samples, before any audio of the interrupting turn is fed.
    truncates = conversation.called("truncate")
    assert [a for _, a in truncates][:1] == [barge["heard_samples"]]
    assert not [t for t, _ in conversation.called("feed") if cancels[0][0] < t < truncates[0][0]]
    first_play = result.events("reply_latency")[0]["t"]
    heard_s = barge["heard_samples"] / 24_000
    assert abs(heard_s - (barge["t"] - first_play)) < 0.2, "heard_samples is not what was played"
    started = result.log[0]
    in_latency, out_latency = started["latency_s"]
    # Onset = the first 32 ms window the VAD scores as speech; espeak's leading consonants start
    # up to ~150 ms before that in energy terms (reported, not asserted).
    onset = barge["onset_sample"]
    device_ms = 1000 * (in_latency + out_latency)
    loop_ms = 1000 * LOOP_PERIOD_S  # at most this long until the control loop reads the mic
    reaction_ms = (barge["detect_sample"] - onset) / 16 + device_ms + loop_ms
    mic = sf.read(next(result.record_dir.glob("*-mic.wav")), dtype="float32")[0]
    energy_onset = _onset_after(mic, barge["detect_sample"] - 8000)
    print(f"\nbarge-in: VAD onset -> playback silenced in {reaction_ms:.0f} ms (detection "
          f"{(barge['detect_sample'] - onset) / 16:.0f} ms + device latencies {device_ms:.0f} ms + "
          f"loop {loop_ms:.0f} ms); from energy onset "
          f"{(barge['detect_sample'] - energy_onset) / 16 + device_ms + loop_ms:.0f} ms; "
          f"heard {heard_s:.2f} s")
    assert reaction_ms < BARGE_IN_BOUND_MS
    # The new user turn keeps the speech that interrupted: it starts before the detected onset.
    later = [e for e in result.events("user_turn_started") if e["t"] >= barge["t"]]
    assert later and later[0]["start_sample"] <= onset - 4800  # pre-roll kept
    assert len(conversation.called("end_turn")) == 2
    # Playback really stopped: the long reply is not heard to its end.
    assert result.events("turn_finished")[-1]["audio_samples"] < len(long_reply)
    assert len(result.events("interrupted")) == 1


def _onset_after(mic: np.ndarray, start: int, threshold: float = 0.02) -> int:
    """First sample at or after `start` whose 10 ms RMS exceeds `threshold`."""
    start = max(start, 0)
    frames = mic[start:start + (len(mic) - start) // 160 * 160].reshape(-1, 160)
    loud = np.flatnonzero(np.sqrt(np.mean(frames ** 2, axis=1)) > threshold)
    assert len(loud), "no speech onset found in the mic recording"
    return start + int(loud[0]) * 160


@pytest.mark.parametrize("echo_cancellation", [True, False], ids=["aec", "headphones"])
def test_echo_of_reply_triggers_barge_in_only_without_aec(vaudio, tmp_path, echo_cancellation):
    question = espeak("What time is it?")
    spoken_reply = espeak("It is a quarter past three in the afternoon, and the sun is still up.",
                          voice="en+m3", gain=0.6)
    conversation = ScriptedConversation([Reply(spoken_reply)])
    script = np.concatenate([silence(0.3), question, silence(1.0 + len(spoken_reply) / TEST_RATE)])
    settings = session_settings(tmp_path, **{"audio.echo_cancellation": echo_cancellation})
    result = run_conversation(settings, factory_for(conversation), script, echo_gain=0.5)

    assert result.error is None
    assert len(conversation.called("end_turn")) >= 1
    barge_ins = result.events("barge_in")
    print(f"\necho, AEC {'on' if echo_cancellation else 'off'}: {len(barge_ins)} barge-in(s)")
    if echo_cancellation:
        assert barge_ins == [] and result.events("interrupted") == []
        assert result.events("turn_finished")  # the reply played to its end
    else:
        assert barge_ins, "the reply's own echo should interrupt it without echo cancellation"
