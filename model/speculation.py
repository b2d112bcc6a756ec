"""A reply started ahead of the end of turn: `Speculation` holds it at its first audio packet.

At a pause that may end the user's turn, the reply is started before the turn is decided, so that
the engine's share of the wait (prefill, first token, first frame, the vocoder: the first packet)
is done by the time the decision comes. Lifecycle:

    speculation = Speculation(conversation)   # checkpoint, then the reply up to its first packet
    speculation.take_back()                   # the user went on: exactly as before it
    for event in speculation.events(): ...    # or the turn ended there: the reply, from the start

Works with any `Conversation` (model/protocol.py): its `checkpoint` and `rollback` make the
take-back exact. Used by the session's worker and by `duplex-chat bench`, which ends with
speculated turns (model/bench.py `speculated_turn`).
"""

from __future__ import annotations

import itertools
import time
from typing import Iterator

from .events import AudioPacket, Event
from .protocol import Conversation


class Speculation:
    """A reply run up to its first audio packet (or its end, if it has none) and held there.
    `compute_s`: how long that took (host clock; the packet's samples are on the host, so the
    device's work up to it is done)."""

    def __init__(self, conversation: Conversation):
        started = time.perf_counter()
        self.conversation = conversation
        self.checkpoint = conversation.checkpoint()
        self._stream = conversation.end_turn()
        self.held: list[Event] = []
        for event in self._stream:
            self.held.append(event)
            if isinstance(event, AudioPacket):
                break
        self.compute_s = time.perf_counter() - started
        self._over = False

    def events(self) -> Iterator[Event]:
        """The reply's events from its start: those held, then the rest as it is generated."""
        self._claim()
        return itertools.chain(self.held, self._stream)

    def take_back(self) -> None:
        """Drop the reply and roll the conversation back to before it."""
        self._claim()
        self._stream.close()
        self.conversation.rollback(self.checkpoint)

    def close(self) -> None:
        """Abandon it (the conversation is ending): nothing is restored."""
        if not self._over:
            self._over = True
            self._stream.close()

    def _claim(self) -> None:
        if self._over:
            raise RuntimeError("a speculation is played or taken back once")
        self._over = True
