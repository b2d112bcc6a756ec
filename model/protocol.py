"""What a conversation looks like from the outside: the contract `talk`, `replay` and the view rely on.

The streaming engine (`engine.StreamingConversation`) implements it; tests use scripted fakes.
"""

from __future__ import annotations

from typing import Iterable, Iterator, Protocol

import numpy as np

from duplex_chat.config import DuplexError

from .events import Event

MAX_INSTRUCTIONS_CHARS = 4000  # a longer system prompt would crowd out the conversation


def pick_voice(voice: str, voices: Iterable[str]) -> str:
    """`voice` as the model names it (case does not matter), or one DuplexError naming them."""
    names = {name.lower(): name for name in voices}
    if not isinstance(voice, str) or voice.lower() not in names:
        raise DuplexError(f"Unknown voice {voice!r}; this model speaks "
                          f"{', '.join(sorted(names.values()))}.")
    return names[voice.lower()]


def check_instructions(system_prompt: str) -> str:
    """A system prompt as `configure` takes it: a string of at most MAX_INSTRUCTIONS_CHARS
    characters ("" means none); otherwise one DuplexError."""
    if not isinstance(system_prompt, str):
        raise DuplexError("The instructions (system prompt) must be text.")
    if len(system_prompt) > MAX_INSTRUCTIONS_CHARS:
        raise DuplexError(f"The instructions are {len(system_prompt)} characters long; at most "
                          f"{MAX_INSTRUCTIONS_CHARS} are allowed.")
    return system_prompt


class Conversation(Protocol):
    """One conversation's state, with an explicit lifecycle.

    Threading: `feed`, `end_turn` (iteration), `truncate`, `discard_turn`, `checkpoint`,
    `rollback`, `configure` and `reset` run on one worker thread; `cancel` may be called from
    any thread at any time, and `voices` too.
    """

    def feed(self, samples: np.ndarray) -> None:
        """Hear more of the current user turn. samples: (n,) float32 mono at 16 kHz, any n >= 0."""

    def end_turn(self) -> Iterator[Event]:
        """The user stopped talking: stream the reply as events until it ends or is cancelled."""

    def cancel(self, heard_samples: int) -> None:
        """Barge-in: stop the reply within one decode step; only the first `heard_samples` samples
        (24 kHz) of the reply audio were played, and history keeps the text up to there. Harmless
        between turns or when called twice."""

    def truncate(self, heard_samples: int) -> str:
        """Only the first `heard_samples` samples (24 kHz) of the last reply, which has ended,
        were heard: history keeps the text up to there, as after `cancel`. Allowed until the next
        user turn's first `feed`; a reply heard whole stays as it is. Returns the text kept."""

    def discard_turn(self) -> None:
        """Forget audio fed since the last reply (a false start); harmless if nothing was fed."""

    def checkpoint(self) -> object:
        """The conversation as it stands, before a speculative `end_turn` (a reply started at a
        pause, before the end of turn is certain). Pass it to `rollback`."""

    def rollback(self, checkpoint: object) -> None:
        """Take a speculative reply back (its event iterator closed first): the conversation is
        exactly as at `checkpoint`, and goes on as if it had never speculated."""

    def voices(self) -> tuple[str, ...]:
        """The voices the model speaks, as `configure` takes them (case does not matter)."""

    def configure(self, voice: str | None = None, system_prompt: str | None = None) -> None:
        """Speak as `voice` and follow `system_prompt` ("" for none) from the next reply on
        (None: keep the current one). No rebuild: the history stays, and under a new system
        prompt it is prefilled again before the next reply (a reply that ended can still be
        truncated). An unknown voice or an over-long prompt raises DuplexError (`pick_voice`,
        `check_instructions`) and changes nothing."""

    def reset(self, voice: str | None = None, system_prompt: str | None = None) -> None:
        """Forget the whole conversation (history, caches); `voice` and `system_prompt` as in
        `configure` (None: keep the current one)."""
