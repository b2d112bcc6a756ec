"""The stock path: transformers' own `generate()` on a whole conversation, not streaming.

It is the reference the engine is checked against (tests, `bench --verify`) and what
`replay --stock` uses. It answers only after the whole reply is written and voiced.
"""

from __future__ import annotations

import dataclasses
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch

from duplex_chat.audio.features import offline_mel
from duplex_chat.config import QwenSettings

from .engine import frames_heard, sync
from .events import AudioPacket, Event, StageTimings, TextDelta, TurnFinished, TurnStarted
from .listener import thinker_audio_tower
from .prompt import MEL_FRAMES_PER_CHUNK, ChatTokens, audio_token_count
from .protocol import check_instructions, pick_voice


@dataclass
class ReferenceReply:
    reply_ids: list[int]  # generated text ids, including the end token if it was produced
    codes: torch.Tensor | None  # (16, frames) codec codes, None for a text-only reply
    waveform: torch.Tensor | None  # (samples,) float32 at 24 kHz from generate()


def conversation_ids(tokens: ChatTokens, tokenizer, system_prompt: str, mel_lengths: list[int],
                     replies: list[list[int]]) -> list[int]:
    """Prompt ids for user turns of `mel_lengths` mel frames, with earlier `replies` in between,
    ending with the assistant header for the next reply."""
    assert len(replies) == len(mel_lengths) - 1
    ids = tokens.system_ids(tokenizer, system_prompt)
    for i, frames in enumerate(mel_lengths):
        ids += tokens.user_turn(audio_token_count(frames))
        if i < len(replies):
            ids += tokens.assistant_head() + list(replies[i]) + tokens.assistant_tail()
    return ids + tokens.assistant_head()


@contextmanager
def _capture_codes(model, sink: list):
    """generate() does not return the talker's codes; catch them on their way to code2wav."""
    original = model.code2wav.chunked_decode

    def capture(codes, *args, **kwargs):
        sink.append(codes.detach().clone())
        return original(codes, *args, **kwargs)

    model.code2wav.chunked_decode = capture
    try:
        yield
    finally:
        del model.code2wav.chunked_decode  # back to the class's method


@contextmanager
def encoder_window(model, window_s: float | None):
    """While inside, the audio encoder attends within windows of `window_s` seconds (None: the
    checkpoint's own `n_window_infer`, 8 s in the release). Restored on the way out, so a stock
    generate() later in the process sees the checkpoint's window."""
    tower = thinker_audio_tower(model.thinker)
    saved = tower.n_window_infer
    if window_s is not None:
        tower.n_window_infer = int(window_s * MEL_FRAMES_PER_CHUNK)
    try:
        yield
    finally:
        tower.n_window_infer = saved


@torch.inference_mode()
def reference_reply(bundle, q: QwenSettings, features: list[torch.Tensor],
                    replies: list[list[int]], max_frames: int = 1500,
                    encoder_window_s: float | None = None) -> ReferenceReply:
    """Run `generate()` on a conversation.

    features: one (128, T_i) log-mel tensor per user turn; replies: the text ids of the replies
    to all but the last turn. Sampling follows `q` (greedy or the per-stage settings).
    `encoder_window_s`: the audio encoder's attention window for this call (the engine's
    `q.encoder_window_s` to compare with the engine; None: the checkpoint's own).
    """
    model, tokenizer = bundle.model, bundle.tokenizer
    tokens = ChatTokens.from_model(model.config, tokenizer)
    lengths = [f.shape[1] for f in features]
    ids = conversation_ids(tokens, tokenizer, q.system_prompt, lengths, replies)
    device = bundle.device
    batch = torch.zeros(len(features), features[0].shape[0], max(lengths))
    mask = torch.zeros(len(features), max(lengths), dtype=torch.long)
    for i, f in enumerate(features):
        batch[i, :, : f.shape[1]] = f
        mask[i, : f.shape[1]] = 1
    input_ids = torch.tensor([ids], device=device)
    kwargs = dict(
        input_ids=input_ids,
        attention_mask=torch.ones_like(input_ids),
        input_features=batch.to(device=device, dtype=bundle.dtype),
        feature_attention_mask=mask.to(device),
        speaker=q.voice,
        thinker_max_new_tokens=q.max_reply_tokens,
        thinker_do_sample=not q.greedy,
        talker_do_sample=not q.greedy,
        talker_max_new_tokens=max_frames + 1,  # the last sampled code never gets its frame
        talker_repetition_penalty=q.talker_repetition_penalty,
    )
    if not q.greedy:
        kwargs.update(thinker_temperature=q.thinker_temperature, thinker_top_p=q.thinker_top_p,
                      thinker_top_k=q.thinker_top_k, talker_temperature=q.talker_temperature,
                      talker_top_p=q.talker_top_p, talker_top_k=q.talker_top_k)
    captured: list[torch.Tensor] = []
    with _capture_codes(model, captured), encoder_window(model, encoder_window_s), \
            warnings.catch_warnings():
        # generate() warns that the talker's repetition penalty sees only new codes: intended.
        warnings.filterwarnings("ignore", message=".*repetition_penalty.*", category=UserWarning)
        sequences, waveform = model.generate(**kwargs)
    reply = sequences[0, len(ids):].tolist()
    codes = captured[0][0] if captured else None
    return ReferenceReply(reply, codes, waveform.reshape(-1).float() if waveform is not None else None)


class StockConversation:
    """The `Conversation` protocol on top of `generate()`: nothing happens until the turn ends,
    then the whole reply arrives at once. For `replay --stock` and the benchmark baseline."""

    def __init__(self, bundle, q: QwenSettings):
        self.bundle, self.q = bundle, q
        self.device = bundle.device
        self.reset()

    def voices(self) -> tuple[str, ...]:
        speakers = self.bundle.model.config.talker_config.speaker_id
        return tuple(sorted(s.capitalize() for s in speakers))

    def configure(self, voice: str | None = None, system_prompt: str | None = None) -> None:
        """generate() gets the whole conversation each turn: the next one simply uses these."""
        changes = {}
        if voice is not None:
            changes["voice"] = pick_voice(voice, self.voices())
        if system_prompt is not None:
            changes["system_prompt"] = check_instructions(system_prompt)
        self.q = dataclasses.replace(self.q, **changes)

    def reset(self, voice: str | None = None, system_prompt: str | None = None) -> None:
        self.configure(voice, system_prompt)
        self._features: list[torch.Tensor] = []
        self._replies: list[list[int]] = []
        self._last_reply = (0, 0)  # frames of the last reply, tokens its talker was given
        self._audio: list[np.ndarray] = []
        self.turn_index = 0

    def feed(self, samples: np.ndarray) -> None:
        self._last_reply = (0, 0)  # a new turn: the last reply can no longer be cut
        self._audio.append(np.asarray(samples, dtype=np.float32).reshape(-1))

    def discard_turn(self) -> None:
        self._audio = []

    def checkpoint(self) -> tuple:
        """See `Conversation.checkpoint`: the turn's audio, the history and the global random
        state generate() samples from."""
        rng = torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None
        return (list(self._audio), list(self._features), [list(r) for r in self._replies],
                self._last_reply, self.turn_index, torch.get_rng_state(), rng)

    def rollback(self, checkpoint: tuple) -> None:
        """See `Conversation.rollback`."""
        audio, features, replies, self._last_reply, self.turn_index, rng, cuda_rng = checkpoint
        self._audio, self._features, self._replies = list(audio), list(features), replies
        torch.set_rng_state(rng)
        if cuda_rng is not None:
            torch.cuda.set_rng_state(cuda_rng, self.device)

    def cancel(self, heard_samples: int) -> None:
        """generate() cannot be stopped midway; the whole reply stays in the history (`truncate`
        can cut it afterwards)."""

    def truncate(self, heard_samples: int) -> str:
        """History keeps the text of the frames heard, one token per frame (the engine's rule),
        until the next turn's audio arrives."""
        if self._audio:
            raise RuntimeError("truncate() after the next user turn started")
        if not self._replies:
            return ""
        played, fed = self._last_reply
        heard = frames_heard(heard_samples, int(self.bundle.model.code2wav.total_upsample))
        if heard < played:
            self._replies[-1] = self._replies[-1][:min(heard, fed)]
        return self.bundle.tokenizer.decode(self._replies[-1], skip_special_tokens=True)

    def end_turn(self) -> Iterator[Event]:
        started = time.perf_counter()
        audio = np.concatenate(self._audio) if self._audio else np.zeros(0, np.float32)
        self._audio, self._last_reply = [], (0, 0)
        features, frames = offline_mel(audio)
        turn, self.turn_index = self.turn_index, self.turn_index + 1
        yield TurnStarted(turn, frames / 100)
        if frames == 0:
            yield TurnFinished(turn, "", (), 0, "empty")
            return
        self._features.append(features)
        max_frames = max(1, int(self.q.max_reply_seconds * 12.5))
        result = reference_reply(self.bundle, self.q, self._features, self._replies, max_frames)
        sync(self.bundle.device)
        elapsed_ms = 1000 * (time.perf_counter() - started)
        eos = self.bundle.model.config.im_end_token_id
        ids = [i for i in result.reply_ids if i != eos]
        self._replies.append(ids)
        text = self.bundle.tokenizer.decode(ids, skip_special_tokens=True)
        yield TextDelta(turn, text, tuple(result.reply_ids))
        samples = 0
        if result.waveform is not None:
            wave = result.waveform.cpu().numpy()
            samples = wave.shape[0]
            yield AudioPacket(turn, wave, 0, int(result.codes.shape[1]) if result.codes is not None else 0)
        frames = int(result.codes.shape[1]) if result.codes is not None else 0
        self._last_reply = frames, len(result.reply_ids) - 1  # generate() never feeds its last
        yield StageTimings(turn, first_packet=elapsed_ms, total=elapsed_ms,
                           reply_tokens=len(result.reply_ids))
        ended = "eos" if result.reply_ids and result.reply_ids[-1] == eos else "max_tokens"
        yield TurnFinished(turn, text, tuple(ids), samples, ended)
