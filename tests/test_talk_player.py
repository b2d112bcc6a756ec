"""talk's `SpeakerPlayer` over a fake output ring: when a reply counts as played out."""

from __future__ import annotations

import types

import numpy as np

from duplex_chat.cli import talk
from duplex_chat.cli.talk import SpeakerPlayer

OUTPUT_LATENCY_S = 0.05


class FakeRing:
    """The parts of AudioIO that SpeakerPlayer uses (talk.OutputRing), set by the test."""

    def __init__(self):
        self.output_free_s = 10.0
        self.queued_output_s = 0.0
        self.latency_s = (0.01, OUTPUT_LATENCY_S)
        self.played = 0
        self.calls: list[str] = []

    def begin_reply(self) -> None:
        self.calls.append("begin_reply")

    def write_output(self, samples: np.ndarray) -> int:
        self.queued_output_s += len(samples) / 24_000
        return 0

    def end_reply(self) -> None:
        self.calls.append("end_reply")

    def flush(self) -> int:
        self.queued_output_s = 0.0
        return self.played

    def reply_played_samples(self) -> int:
        return self.played


def test_a_reply_has_played_out_once_ended_drained_and_the_output_latency_passed(monkeypatch):
    now = [100.0]
    monkeypatch.setattr(talk, "time", types.SimpleNamespace(monotonic=lambda: now[0]))
    ring = FakeRing()
    player = SpeakerPlayer(ring)
    player.begin_reply(1)
    player.write(np.zeros(2400, np.float32))  # 0.1 s queued
    assert not player.progress().finished  # still playing, and the worker may write more

    ring.queued_output_s = 0.0
    assert not player.progress().finished  # ran dry, but not ended: the engine may be slow
    player.end_reply()
    ring.queued_output_s = 0.02
    assert not player.progress().finished  # ended, but its last samples are still queued

    ring.queued_output_s, ring.played = 0.0, 2400
    now[0] = 100.5  # drained: the output latency counts from the first look that sees it
    progress = player.progress()
    assert (progress.reply, progress.heard, progress.finished) == (1, 2400, False)
    now[0] += OUTPUT_LATENCY_S - 0.001
    assert not player.progress().finished  # the last samples are still inside the device
    now[0] += 0.001
    assert player.progress().finished

    player.begin_reply(2)  # a new reply starts over
    assert ring.calls == ["begin_reply", "end_reply", "begin_reply"]
    assert player.progress().reply == 2 and not player.progress().finished
