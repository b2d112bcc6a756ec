"""Listening: 16 kHz audio -> log-mel -> audio-encoder windows -> thinker-ready audio embeddings.

The encoder convolves every 100 mel frames (1 s) on its own and attends within windows of
`window_frames` mel frames, so a finished window never changes once later audio arrives: it is
encoded once, while the user is still talking. At the end of the turn only the unfinished tail
is encoded. The result equals encoding the whole turn at once with `n_window_infer = window_frames`.
"""

from __future__ import annotations

import numpy as np
import torch

from duplex_chat.audio.features import StreamingMel

from .prompt import MEL_FRAMES_PER_CHUNK


def thinker_audio_tower(thinker: torch.nn.Module) -> torch.nn.Module:
    """The audio encoder, wherever this transformers version keeps it."""
    tower = getattr(thinker, "audio_tower", None)
    return tower if tower is not None else thinker.model.audio_tower


def thinker_text_model(thinker: torch.nn.Module) -> torch.nn.Module:
    """The thinker's decoder stack (5.17: `thinker.model`; later: `thinker.model.language_model`)."""
    inner = thinker.model
    return getattr(inner, "language_model", inner)


class Listener:
    """Turns one user turn's audio into audio embeddings, window by window.

    `feed` returns embeddings (n, d) for every window that finished (often none); `finish` returns
    those of the tail. `mel_frames` counts all frames of the turn so far.
    """

    def __init__(self, thinker: torch.nn.Module, window_s: float):
        if window_s * MEL_FRAMES_PER_CHUNK % MEL_FRAMES_PER_CHUNK:
            raise ValueError("the encoder window must be a whole number of seconds")
        self.tower = thinker_audio_tower(thinker)
        self.window_frames = int(window_s * MEL_FRAMES_PER_CHUNK)
        # What the offline encoder (and so generate()) would do with the same window.
        self.tower.n_window_infer = self.window_frames
        self.mel = StreamingMel()
        self._pending: list[torch.Tensor] = []  # (128, k) frames not yet encoded
        self._pending_frames = 0
        self.mel_frames = 0

    def reset(self) -> None:
        self.mel.reset()
        self._pending, self._pending_frames, self.mel_frames = [], 0, 0

    def feed(self, samples: np.ndarray) -> torch.Tensor | None:
        """samples: (n,) float32 at 16 kHz. Returns (tokens, d) for finished windows, or None."""
        self._add(self.mel.feed(samples))
        if self._pending_frames < self.window_frames:
            return None
        frames = torch.cat(self._pending, dim=1)
        whole = frames.shape[1] // self.window_frames * self.window_frames
        self._pending = [frames[:, whole:]]
        self._pending_frames = frames.shape[1] - whole
        windows = frames[:, :whole].split(self.window_frames, dim=1)
        return torch.cat([self._encode(w) for w in windows])

    def finish(self) -> torch.Tensor | None:
        """End of turn: (tokens, d) for the unfinished tail, or None when there is none."""
        self._add(self.mel.finish())
        if self._pending_frames == 0:
            return None
        frames = torch.cat(self._pending, dim=1)
        self._pending, self._pending_frames = [], 0
        return self._encode(frames)

    def _add(self, frames: torch.Tensor) -> None:
        if frames.shape[1]:
            self._pending.append(frames)
            self._pending_frames += frames.shape[1]
            self.mel_frames += frames.shape[1]

    @torch.inference_mode()
    def _encode(self, frames: torch.Tensor) -> torch.Tensor:
        """frames: (128, T) with T <= window_frames -> (tokens, d_thinker)."""
        weight = self.tower.conv2d1.weight
        features = frames.to(device=weight.device, dtype=weight.dtype)
        lengths = torch.tensor([features.shape[1]], device=weight.device)
        out = self.tower(input_features=features, feature_lens=lengths, return_dict=True)
        return out.last_hidden_state
