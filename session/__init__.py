"""Turn-taking: who speaks when, for `talk`, `replay` and `serve`.

The session sits between the loops that move audio (terminal, file, socket) and the model. It
takes microphone samples (16 kHz, counted from the start: the session's clock) and what the
player reports as heard, and decides turns: voice onset and end of turn (a `TurnPolicy`),
pre-roll, the barge-in decision with its echo checks, what of each reply was heard, and each
turn's latency. A worker thread owns the `Conversation` and takes typed commands. What happens
comes out as typed session events (`events.py`). It imports nothing of terminals, sockets or
PortAudio.

Modules: `session.py` (the `Session`), `policy.py` (turn policies), `smart_turn.py` (the
semantic end of turn: Smart Turn v3.2 as a policy), `bargein.py` (the barge-in
decision and its echo checks), `worker.py` (commands, the worker, the `Player` contract),
`virtual.py` (a player on a virtual clock, for `replay`), `events.py`. A speculative start
(`turn.speculate_ms`) runs the reply at a pause before the turn is decided and takes it back
exactly if the user goes on (`duplex_chat.model.speculation`).
"""

from .events import (
    BargeInLapsed,
    DeviceTrouble,
    EngineEvent,
    HistoryCut,
    Interrupted,
    ReplyAudible,
    ReplyFinished,
    ReplyStarted,
    SessionEvent,
    SpeculationStarted,
    SpeculationTakenBack,
    TurnCommitted,
    TurnDiscarded,
    UserSpeechEnded,
    UserSpeechStarted,
)
from .policy import SilencePolicy, TurnPolicy, make_policy
from .session import Echo, Session, SpeculationCounts
from .virtual import MODELED_FIRST_PACKET_S, VirtualPlayer
from .worker import Player, Progress

__all__ = [
    "BargeInLapsed", "DeviceTrouble", "Echo", "EngineEvent", "HistoryCut", "Interrupted",
    "MODELED_FIRST_PACKET_S", "Player", "Progress", "ReplyAudible", "ReplyFinished",
    "ReplyStarted", "Session", "SessionEvent", "SilencePolicy", "SpeculationCounts",
    "SpeculationStarted", "SpeculationTakenBack", "TurnCommitted", "TurnDiscarded", "TurnPolicy",
    "UserSpeechEnded", "UserSpeechStarted", "VirtualPlayer", "make_policy",
]
