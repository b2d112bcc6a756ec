"""What a conversation looks like from the outside: the contract `talk`, `replay` and the view rely on.

The streaming engine (`engine.StreamingConversation`) implements it; tests use scripted fakes.
"""

from __future__ import annotations

from typing import Iterator, Protocol

import numpy as np

from .events import Event


class Conversation(Protocol):
    """One conversation's state, with an explicit lifecycle.

    Threading: `feed`, `end_turn` (iteration), `truncate`, `discard_turn` and `reset` run on one
    worker thread; `cancel` may be called from any thread at any time.
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

    def reset(self) -> None:
        """Forget the whole conversation (history, caches); the system prompt stays."""
