"""Listening: 16 kHz audio -> log-mel -> audio-encoder windows -> thinker-ready audio embeddings.

The encoder convolves every 100 mel frames (1 s) on its own and attends within windows of
`window_frames` mel frames, so a finished window never changes once later audio arrives: it is
encoded once, while the user is still talking. At the end of the turn only the unfinished tail
is encoded. The result equals encoding the whole turn at once with `n_window_infer = window_frames`
in a batch whose chunks are padded to a whole 100 frames, which is what `generate()` does whenever
one turn of the conversation is at least 1 s long (see `_encode`).

The listener never changes the model: it hands the encoder its chunks and its one attention
window itself, so the checkpoint's own `n_window_infer` stays what a stock `generate()` uses.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from duplex_chat.audio.features import StreamingMel

from .prompt import MEL_FRAMES_PER_CHUNK, TOKENS_PER_FULL_CHUNK, audio_token_count


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
        self.mel = StreamingMel()
        self._pending: list[torch.Tensor] = []  # (128, k) frames not yet encoded
        self._pending_frames = 0
        self.mel_frames = 0

    def reset(self) -> None:
        self.mel.reset()
        self._pending, self._pending_frames, self.mel_frames = [], 0, 0

    def state(self) -> tuple:
        """The turn so far (the mel extractor's and the frames not yet encoded), for `restore`."""
        return self.mel.state(), list(self._pending), self._pending_frames, self.mel_frames

    def restore(self, state: tuple) -> None:
        """Back to the moment `state()` was taken (a speculative `finish` taken back)."""
        mel, pending, self._pending_frames, self.mel_frames = state
        self.mel.restore(mel)
        self._pending = list(pending)

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
        """frames: (128, T), 0 < T <= window_frames: one attention window -> (tokens, d_thinker).

        The encoder's convolutions see each 100-frame chunk on its own, and the last, partial
        chunk padded with zeros to 100 frames, as `generate()` pads it beside the turn's full
        chunks: its convolutions read that padding (after their biases, it is not zero), so a
        tail convolved at its own length would come out different. The chunks, which rows of
        the convolved grid are real, and the one attention window are handed to the encoder
        (the precomputed inputs its forward accepts), so nothing depends on the checkpoint's
        `n_window_infer`."""
        weight = self.tower.conv2d1.weight
        device = weight.device
        features = frames.to(device=device, dtype=weight.dtype)
        bins, length = features.shape
        chunks = -(-length // MEL_FRAMES_PER_CHUNK)
        padded = F.pad(features, (0, chunks * MEL_FRAMES_PER_CHUNK - length))
        padded = padded.view(bins, chunks, MEL_FRAMES_PER_CHUNK).transpose(0, 1)  # (chunks, 128, 100)
        chunk_lengths = [MEL_FRAMES_PER_CHUNK] * (chunks - 1)
        chunk_lengths.append(length - MEL_FRAMES_PER_CHUNK * (chunks - 1))
        valid = torch.cat([i * TOKENS_PER_FULL_CHUNK + torch.arange(audio_token_count(n))
                           for i, n in enumerate(chunk_lengths)]).to(device)
        tokens = audio_token_count(length)
        out = self.tower(
            input_features=features, feature_lens=torch.tensor([length], device=device),
            padded_feature=padded.contiguous(), chunk_lengths=torch.tensor(chunk_lengths, device=device),
            valid_indices=valid, cu_seqlens=torch.tensor([0, tokens], dtype=torch.int32, device=device),
            return_dict=True)
        return out.last_hidden_state
