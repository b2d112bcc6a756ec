"""The worker that owns the Conversation, its typed commands, and the Player it plays into.

`feed`, `end_turn` and `truncate` run on the worker (the Conversation's rule); `cancel` comes
from the session's thread, and again from the worker when a stop came before its reply started. Reply packets go straight from the worker into the `Player`, so
playback never waits on the session's loop. `ReplyGate` makes a barge-in's stop and the
worker's writes atomic: no packet of a cancelled reply is queued after the stop.

`Worker` is a thread (talk: the engine runs while the microphone keeps flowing); `InlineWorker`
runs each command at once on the caller's thread (replay: results must not depend on timing).
"""

from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from duplex_chat.audio.constants import OUTPUT_SAMPLE_RATE
from duplex_chat.model.events import AudioPacket, Event
from duplex_chat.model.protocol import Conversation
from duplex_chat.model.speculation import Speculation

OUTPUT_WAIT_S = 0.01  # worker's wait when the player has no room


# ---- what the player reports, and what it must do ---------------------------------------------
@dataclass(frozen=True)
class Progress:
    """How far the player is with reply `reply`: `heard` samples (24 kHz) audible so far;
    `finished`: nothing more of it will sound (played out after its end, or stopped and final).
    `audible_since`: the session sample (16 kHz, the session's clock) where the reply's first
    sample became audible, when the player knows it; None: the session assumes the reply has
    played without a gap since then (a live speaker's ring buffer)."""

    reply: int
    heard: int
    finished: bool
    audible_since: int | None = None


class Player(Protocol):
    """Where reply audio goes: a speaker, a socket, a timeline. `begin_reply`, `stop` and
    `progress` are called from the session's thread; `room_s`, `write` and `end_reply` from the
    worker's, under the ReplyGate's lock (except room_s)."""

    def begin_reply(self, reply: int) -> None:
        """A new reply starts: count what is heard from here."""

    def room_s(self) -> float:
        """Seconds of audio the player can take now (the worker waits while it is too little)."""

    def write(self, samples: np.ndarray) -> None:
        """Queue reply audio (n,) float32 at 24 kHz."""

    def end_reply(self) -> None:
        """No more audio is coming for this reply."""

    def stop(self) -> int | None:
        """Barge-in: drop queued audio now. Returns the samples heard, or None when the player
        learns that only later (it then reports it through `progress` with finished=True)."""

    def progress(self) -> Progress:
        """The current reply's progress (may lag: a browser reports playback after the fact)."""


class ReplyGate:
    """Which reply may still reach the player (its `generation`), and the lock that makes a stop
    and the worker's writes atomic."""

    def __init__(self) -> None:
        self.generation = 0
        self.lock = threading.Lock()
        self.written = 0  # samples (24 kHz) of the current generation written to the player
        self.kept = 0  # samples (24 kHz) the last `stop` told the engine to keep

    def begin(self, player: Player) -> int:
        """A new reply may play: returns its generation (the player is told before any packet)."""
        with self.lock:
            self.generation += 1
            self.written = 0
            player.begin_reply(self.generation)
            return self.generation

    def stop(self, player: Player) -> tuple[int | None, int]:
        """No packet of the current reply reaches the player any more; stop it. Returns what the
        player says was heard (None: it reports later) and the samples (24 kHz) the engine should
        keep: what was heard, or, unknown yet, everything written (a later truncate cuts it)."""
        with self.lock:
            self.generation += 1
            heard = player.stop()
            self.kept = heard if heard is not None else self.written
            return heard, self.kept

    def write(self, player: Player, reply: int, samples: np.ndarray) -> bool:
        """Queue `samples` of reply `reply` unless it was stopped; True if written."""
        with self.lock:
            if reply != self.generation:
                return False
            player.write(samples)
            self.written += len(samples)
            return True


# ---- commands and what comes back ------------------------------------------------------------
@dataclass(frozen=True)
class Feed:
    """More of the user's turn: `Conversation.feed`."""

    samples: np.ndarray  # (n,) float32, 16 kHz


@dataclass(frozen=True)
class EndTurn:
    """The user's turn is over: generate the reply and play it (`Conversation.end_turn`)."""

    reply: int  # the ReplyGate generation this reply may play under


@dataclass(frozen=True)
class Speculate:
    """End the turn ahead of the decision: checkpoint the conversation, run its reply up to the
    first audio packet and hold it, unplayed. The next EndTurn plays it from there; a TakeBack
    drops it and rolls the conversation back (`Conversation.checkpoint` / `rollback`)."""

    turn: int
    key: int  # the session's number for this speculation


@dataclass(frozen=True)
class TakeBack:
    """The user went on speaking: drop the held speculative reply, roll the conversation back."""

    turn: int


@dataclass(frozen=True)
class Truncate:
    """Cut reply `turn` in the history to what was heard (`Conversation.truncate`)."""

    turn: int
    heard_samples: int  # reply samples (24 kHz) heard
    estimated: bool = False  # the player never reported it: the session's estimate


@dataclass(frozen=True)
class Configure:
    """Voice and system prompt from the next reply on (`Conversation.configure`; None: keep).
    Validate them first (`pick_voice`, `check_instructions`): an error here ends the worker."""

    voice: str | None = None
    system_prompt: str | None = None


@dataclass(frozen=True)
class Stop:
    """End the worker."""


Command = Feed | EndTurn | Speculate | TakeBack | Truncate | Configure | Stop


@dataclass(frozen=True)
class EngineOutput:
    """An engine event of the reply that played under generation `reply`."""

    reply: int
    event: Event


@dataclass(frozen=True)
class ReplyDone:
    """The engine has nothing more for the reply of generation `reply`."""

    reply: int


@dataclass(frozen=True)
class Speculated:
    """Speculation `key` (of reply `turn`) is held at its first packet after `compute_s`
    seconds (or ended before one)."""

    turn: int
    key: int
    compute_s: float


@dataclass(frozen=True)
class TakenBack:
    """The speculative reply of `turn` was dropped and rolled back; it had cost `compute_s`."""

    turn: int
    compute_s: float


@dataclass(frozen=True)
class Truncated:
    """A Truncate was done: the history keeps `text` of reply `turn`."""

    turn: int
    heard_samples: int  # reply samples (24 kHz)
    text: str
    estimated: bool = False


@dataclass(frozen=True)
class Failed:
    """The worker died of `error` (the session re-raises it)."""

    error: BaseException


Output = EngineOutput | ReplyDone | Speculated | TakenBack | Truncated | Failed


class InlineWorker:
    """Runs each command at once on the caller's thread; outputs wait in `outputs`."""

    def __init__(self, conversation: Conversation, player: Player, gate: ReplyGate):
        self.conversation, self.player, self.gate = conversation, player, gate
        self.outputs: queue.Queue[Output] = queue.Queue()
        self.stopping = threading.Event()
        self._held: Speculation | None = None

    def start(self) -> None:
        """Nothing to start: commands run on the caller's thread."""

    def submit(self, command: Command) -> None:
        """Run `command` now."""
        self._execute(command)

    def join(self, timeout: float | None = None) -> None:
        """Nothing to wait for."""

    def _execute(self, command: Command) -> bool:
        """Run one command; False once told to stop."""
        if isinstance(command, Stop):
            if self._held is not None:
                self._held.close()
            return False
        if isinstance(command, Feed):
            self.conversation.feed(command.samples)
        elif isinstance(command, Truncate):
            text = self.conversation.truncate(command.heard_samples)
            self.outputs.put(Truncated(command.turn, command.heard_samples, text, command.estimated))
        elif isinstance(command, EndTurn):
            self._reply(command.reply)
        elif isinstance(command, Speculate):
            self._speculate(command.turn, command.key)
        elif isinstance(command, TakeBack):
            self._take_back(command.turn)
        elif isinstance(command, Configure):
            self.conversation.configure(command.voice, command.system_prompt)
        return True

    def _speculate(self, turn: int, key: int) -> None:
        self._held = Speculation(self.conversation)
        self.outputs.put(Speculated(turn, key, self._held.compute_s))

    def _take_back(self, turn: int) -> None:
        held, self._held = self._held, None
        if held is None:
            return
        held.take_back()
        self.outputs.put(TakenBack(turn, held.compute_s))

    def _reply(self, reply: int) -> None:
        held, self._held = self._held, None  # a speculative start plays from where it is held
        events = held.events() if held is not None else self.conversation.end_turn()
        cancelled = False
        for event in events:
            if isinstance(event, AudioPacket):
                self._play(event.samples, reply)
            self.outputs.put(EngineOutput(reply, event))
            if not cancelled and reply != self.gate.generation:
                # Stopped (barge-in, close). The session's own `cancel` is lost if it came
                # before end_turn began (a backlog of feeds): the engine clears it when a reply
                # starts. Only after the first event does a cancel stick, so it is repeated here.
                self.conversation.cancel(self.gate.kept)
                cancelled = True
        with self.gate.lock:
            if reply == self.gate.generation:
                self.player.end_reply()
        self.outputs.put(ReplyDone(reply))

    def _play(self, samples: np.ndarray, reply: int) -> None:
        needed_s = len(samples) / OUTPUT_SAMPLE_RATE
        while self.player.room_s() < needed_s and not self.stopping.is_set():
            if reply != self.gate.generation:
                return
            time.sleep(OUTPUT_WAIT_S)
        self.gate.write(self.player, reply, samples)


class Worker(InlineWorker):
    """The same commands on a thread of their own; an exception ends it and comes out as Failed."""

    def __init__(self, conversation: Conversation, player: Player, gate: ReplyGate):
        super().__init__(conversation, player, gate)
        self.commands: queue.Queue[Command] = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="duplex-worker", daemon=True)

    def start(self) -> None:
        """Start the thread."""
        self._thread.start()

    def submit(self, command: Command) -> None:
        """Queue `command`; the thread runs commands in order."""
        self.commands.put(command)

    def join(self, timeout: float | None = None) -> None:
        """Wait at most `timeout` seconds for the thread to end (after a Stop)."""
        if self._thread.is_alive():
            self._thread.join(timeout)

    def _run(self) -> None:
        try:
            while self._execute(self.commands.get()):
                pass
        except Exception as exc:  # the session's thread re-raises it with its traceback
            self.outputs.put(Failed(exc))
