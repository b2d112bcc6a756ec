"""The live view of a real `talk` session on the PulseAudio virtual devices, as a terminal shows
it: native stderr goes to the log beside the recording, words never show before "speaking", the
speaker meter moves with the reply, and the last frame says "stopped"."""

from __future__ import annotations

import os
import re

import numpy as np
import pytest
from rich.console import Console

from .fake_engine import Reply, ScriptedConversation, chirp, factory_for
from .talk_harness import TEST_RATE, espeak, run_conversation, session_settings
from .virtual_audio import virtual_audio_or_skip

pytestmark = pytest.mark.audio_devices

WIDTH = 100
NATIVE_LINE = b"ALSA lib pcm.c:8570:(snd_pcm_recover) underrun occurred (written by the test)\n"


@pytest.fixture(scope="module")
def vaudio():
    with virtual_audio_or_skip() as devices:
        yield devices


def frames(shown: str) -> list[tuple[str, str]]:
    """(state, whole frame) of every frame the live view drew, in order."""
    found = []
    for piece in re.findall(r"(?s).*?^underruns +\d+", shown, re.MULTILINE):
        state = re.findall(r"^state {2,}(.+?)\s*$", piece, re.MULTILINE)
        if state:
            found.append((state[-1], piece))
    assert found, f"no frame in\n{shown}"
    return found


def test_the_live_view_of_a_real_session(vaudio, tmp_path):
    speech = espeak("Hello there, what is the weather like today?")
    conversation = ScriptedConversation([Reply(chirp(1.5), ("Sunny", "and", "warm."))])
    script = np.concatenate([np.zeros(TEST_RATE // 2, np.float32), speech,
                             np.zeros(3 * TEST_RATE, np.float32)])
    console = Console(record=True, width=WIDTH, force_terminal=True, color_system=None)
    settings = session_settings(tmp_path, **{"ui.plain": False})
    result = run_conversation(settings, factory_for(conversation), script, console=console,
                              during=lambda _: os.write(2, NATIVE_LINE))  # as ALSA does
    assert result.error is None
    shown = console.export_text()

    logs = list(tmp_path.glob("*-stderr.log"))
    assert len(logs) == 1 and logs[0].name.replace("-stderr.log", "-events.jsonl") in {
        p.name for p in tmp_path.glob("*-events.jsonl")}
    assert NATIVE_LINE.decode() in logs[0].read_text()
    assert "underrun occurred" not in shown and "Expression '" not in shown

    drawn = frames(shown)
    first_words = next(state for state, f in drawn if "assistant Sunny" in f)
    assert first_words == "speaking", "the reply's words showed before it was heard"
    speaking = [f for state, f in drawn if state == "speaking"]
    assert speaking and any(re.search(r"^speaker .*dB", f, re.MULTILINE) for f in speaking)
    last_state, last = drawn[-1]
    assert last_state == "stopped" and "assistant Sunny and warm." in last
