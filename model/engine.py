"""The streaming duplex engine: listen while the user speaks, speak from the first frames.

    listening   chunk -> mel -> finished window? -> encode -> prefill thinker (+ talker user part)
    end of turn encode tail -> prefill <|audio_end|><|im_end|>\\n<|im_start|>assistant\\n
    speaking    thinker token -> talker frame (code 0) -> code predictor (codes 1-15)
                -> streaming vocoder -> audio packets, the first after 1-2 frames

One `StreamingConversation` owns a conversation's whole state (caches, positions, history) and
produces exactly what `generate()` would for the same history: same text ids, same codec codes,
same waveform (see tests/test_engine_fidelity.py).
"""

from __future__ import annotations

import contextlib
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator

import numpy as np
import torch

from duplex_chat.config import QwenSettings, Settings

from .events import (
    AudioPacket,
    Event,
    HistoryTrimmed,
    Interrupted,
    StageTimings,
    TextDelta,
    TurnFinished,
    TurnStarted,
)
from .footprint import cache_for, max_reply_frames
from .listener import Listener
from .loading import ModelBundle, load_model
from .prompt import ChatTokens
from .protocol import check_instructions, pick_voice
from .sampling import Sampler, SamplingSettings
from .streams import TalkerStream, ThinkerStream
from .vocoder import StreamingVocoder

GRAPH_WARM_UP_POSITIONS = 4096  # decode graphs captured at start cover conversations this long
PREDICTOR_TOP_K, PREDICTOR_TOP_P = 50, 0.8  # what generate() gives the code predictor when sampling


@dataclass
class _Turn:
    """One exchange as the history keeps it: what the user said and what they heard back."""

    audio: torch.Tensor  # (tokens, d_thinker) audio embeddings of the user's turn
    reply_ids: list[int] = field(default_factory=list)  # reply text ids, no end token


def stage_samplers(q: QwenSettings, talker_config, device: torch.device,
                   generator: torch.Generator) -> tuple[Sampler, Sampler, Sampler]:
    """The thinker's, the talker's (code 0) and the code predictor's samplers, set up for the
    settings `q` as generate() sets them up."""
    vocab = talker_config.text_config.vocab_size
    eos = talker_config.codec_eos_token_id
    # generate() suppresses the codec vocabulary's top 1024 ids (control codes) but the end code
    suppress = torch.tensor([i for i in range(vocab - 1024, vocab) if i != eos], device=device)
    return (
        Sampler(SamplingSettings(q.greedy, q.thinker_temperature, q.thinker_top_k,
                                 q.thinker_top_p), generator=generator),
        Sampler(SamplingSettings(q.greedy, q.talker_temperature, q.talker_top_k, q.talker_top_p,
                                 q.talker_repetition_penalty), suppress=suppress,
                generator=generator),
        Sampler(SamplingSettings(q.greedy, 1.0, PREDICTOR_TOP_K, PREDICTOR_TOP_P),
                generator=generator),
    )


def frames_heard(heard_samples: int, samples_per_frame: int) -> int:
    """Codec frames of which at least a sample was heard: the frames whose text counts as
    heard when a reply is cut (`cancel`, `truncate`)."""
    return -(-max(0, int(heard_samples)) // samples_per_frame)


def sync(device: torch.device) -> None:
    """Wait for queued GPU work, so host clocks measure it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class StreamingConversation:
    """A conversation with explicit lifecycle: feed, end_turn (streams events), cancel,
    truncate, reset.

    Implements `protocol.Conversation`. Not thread-safe except `cancel`.
    """

    def __init__(self, bundle: ModelBundle, settings: Settings, seed: int | None = None):
        self.bundle = bundle
        self.q = settings.qwen
        model = bundle.model
        self.config = model.config
        self.device = bundle.device
        self.tokens = ChatTokens.from_model(self.config, bundle.tokenizer)
        self.tokenizer = bundle.tokenizer
        fast = self.q.decoder == "fast" or (self.q.decoder == "auto" and self.device.type == "cuda")
        self.max_frames = max_reply_frames(self.q.max_reply_seconds)
        thinker_len, talker_len = cache_for(self.q)  # what `check` sizes memory for, too
        self.accept_layer = self.config.talker_config.accept_hidden_layer
        self.thinker = ThinkerStream(model.thinker, fast, thinker_len, self.accept_layer)
        self.talker = TalkerStream(model.talker, fast, talker_len)
        self.listener = Listener(model.thinker, self.q.encoder_window_s)
        self.vocoder = StreamingVocoder(model.code2wav, cuda_graphs=fast and self.device.type == "cuda")
        self.voice = pick_voice(self.q.voice, self.voices())
        self.speaker_id = self._speaker_id(self.voice)
        self.system_prompt = check_instructions(self.q.system_prompt)
        self._prompt_stale = False  # the caches hold another system prompt than `system_prompt`
        self._generator = generator = torch.Generator(device=self.device)
        generator.manual_seed(seed if seed is not None else int(time.time_ns() % 2**31))
        self.codec_eos = self.config.talker_config.codec_eos_token_id
        self.thinker_sampler, self.talker_sampler, self.predictor_sampler = stage_samplers(
            self.q, self.config.talker_config, self.device, generator)
        if fast and self.device.type == "cuda":
            self._capture_graphs()
        self._cancel = threading.Event()
        self._heard_samples = 0
        self.max_context = self.q.max_context_tokens
        with self._working():
            self._tts_embeds()
            self.reset()

    @contextlib.contextmanager
    def _working(self):
        """Inference mode, with the model's GPU as the current CUDA device: graphs, side streams
        and events are made on the current device, which is GPU 0 unless told (cuda:N)."""
        cuda = self.device.type == "cuda"
        with torch.inference_mode(), (torch.cuda.device(self.device) if cuda
                                      else contextlib.nullcontext()):
            yield

    # ----- lifecycle -------------------------------------------------------------------------

    def voices(self) -> tuple[str, ...]:
        """The voices this checkpoint speaks (its talker's speakers), capitalised."""
        return tuple(sorted(s.capitalize() for s in self.config.talker_config.speaker_id))

    def configure(self, voice: str | None = None, system_prompt: str | None = None) -> None:
        """Speak as `voice` and follow `system_prompt` from the next reply on (None: keep).

        The voice is only the speaker code the talker gets at the start of each reply. A new
        system prompt marks the caches stale: before the next user turn opens (or, if one is
        open, before its reply) the history is prefilled again under it, from the stored audio
        embeddings, as after history trimming; until then the last reply can still be
        truncated. Unknown voice or over-long prompt: DuplexError, nothing changed."""
        name = pick_voice(voice, self.voices()) if voice is not None else self.voice
        prompt = check_instructions(system_prompt) if system_prompt is not None \
            else self.system_prompt
        self.voice, self.speaker_id = name, self._speaker_id(name)
        if prompt != self.system_prompt:
            self.system_prompt = prompt
            self._prompt_stale = True

    def reset(self, voice: str | None = None, system_prompt: str | None = None) -> None:
        """Forget the conversation; `voice` and `system_prompt` as in `configure` (None: keep)."""
        self.configure(voice, system_prompt)
        self._prompt_stale = False
        self.thinker.reset()
        self.talker.reset()
        self.listener.reset()
        self.turns: list[_Turn] = []
        self._closed: tuple[_ReplyState, int] | None = None  # last reply, frames it played
        self.turn_index = 0
        self._open_audio: list[torch.Tensor] = []
        self._turn_open = False
        self._pending_events: list[Event] = []  # told when the turn's reply starts
        self._turn_start_thinker = self._turn_start_talker = 0
        self._listen_seconds = 0.0
        self._last_audio: _AudioOut | None = None
        self._cancel.clear()
        with self._working():
            self._prefill_text(self._system_ids(), user=False)

    def feed(self, samples: np.ndarray) -> None:
        """Hear more of the user's turn: (n,) float32 at 16 kHz, any n."""
        samples = np.asarray(samples, dtype=np.float32).reshape(-1)
        with self._working():
            if not self._turn_open:
                self._open_turn()
            audio = self.listener.feed(samples)
            if audio is not None:
                self._prefill_audio(audio)

    def discard_turn(self) -> None:
        """Forget audio fed since the last reply (a false start)."""
        if self._turn_open:
            self.thinker.crop(self._turn_start_thinker)
            self.talker.crop(self._turn_start_talker)
            self.talker.user_length = self.talker.length
            self.listener.reset()
            self._open_audio = []
            self._turn_open = False

    def cancel(self, heard_samples: int) -> None:
        """Barge-in, from any thread: stop within one decode step; `heard_samples` were played."""
        self._heard_samples = max(0, int(heard_samples))
        self._cancel.set()

    def end_turn(self) -> Iterator[Event]:
        """The user stopped talking: stream the reply as events."""
        with self._working():
            yield from self._reply()

    def truncate(self, heard_samples: int) -> str:
        """The user heard only the first `heard_samples` samples (24 kHz) of the last reply, which
        has ended (finished or cancelled): the history keeps the text of the frames heard, by
        the rule `cancel` uses. For a player that learns what was heard after the fact, or a
        barge-in after the reply finished generating (the engine is faster than real time).
        Allowed until the next user turn starts (its first `feed`; after that, even if the turn
        is discarded, nothing is cut); on the worker thread. A reply heard whole (every frame),
        or already cut shorter, stays as it is. Returns the reply's text as kept."""
        if self._turn_open:
            raise RuntimeError("truncate() after the next user turn started")
        if not self.turns:
            return ""
        kept = self.turns[-1].reply_ids
        heard_frames = frames_heard(heard_samples, self.vocoder.samples_per_frame)
        if self._closed is not None and heard_frames < self._closed[1]:
            spoken = self._closed[0].spoken(heard_frames)
            if len(spoken) < len(kept):
                with self._working():
                    self._close_reply(spoken)
                kept = spoken
        return self._decode(kept)

    def _capture_graphs(self) -> None:
        """Compile and capture the decode steps now, not in the middle of the first reply."""
        with self._working():
            self.thinker.stack.warm_up(GRAPH_WARM_UP_POSITIONS)
            self.talker.stack.warm_up(GRAPH_WARM_UP_POSITIONS)
            self.talker.warm_up_frames(GRAPH_WARM_UP_POSITIONS, self.talker_sampler,
                                       self.predictor_sampler)
            for frames in (self.q.first_packet_frames, self.q.packet_frames):
                self.vocoder.push(torch.zeros(16, frames, dtype=torch.long, device=self.device))
            self.vocoder.reset()

    # ----- speculative start ------------------------------------------------------------------

    def checkpoint(self) -> "Checkpoint":
        """The conversation as it stands, to return to with `rollback`: taken before a
        speculative `end_turn` (the turn may not be over yet). Between commands, on the
        worker; the open turn is settled first (opened, or re-prefilled under a new system
        prompt, as its next `feed` or `end_turn` would), so that what follows only appends to
        the caches and cropping them takes it back."""
        with self._working():
            if not self._turn_open:
                self._open_turn()
            elif self._prompt_stale:
                self._reopen_turn()
        fields = {name: getattr(self, name) for name in _TURN_FIELDS}
        fields["turns"] = list(self.turns)
        fields["_open_audio"] = list(self._open_audio)
        fields["_pending_events"] = list(self._pending_events)
        return Checkpoint(self.thinker.length, self.talker.length, self.talker.user_length,
                          self.listener.state(), _rng_states(self._generator), fields)

    def rollback(self, checkpoint: "Checkpoint") -> None:
        """Back to `checkpoint` exactly, the speculative reply since then taken back: caches
        and lengths, the listener's and mel extractor's pending audio, the samplers' random
        state, the history. Close the reply's event iterator first. A conversation that
        rolled back goes on as if it had never speculated (tests/test_speculation.py)."""
        self.thinker.crop(checkpoint.thinker_length)
        self.talker.crop(checkpoint.talker_length)
        self.talker.user_length = checkpoint.talker_user_length
        self.listener.restore(checkpoint.listener)
        self.vocoder.reset()
        _set_rng_states(self._generator, checkpoint.rng)
        for name, value in checkpoint.fields.items():
            setattr(self, name, value)
        self._cancel.clear()

    @property
    def last_codes(self) -> torch.Tensor:
        """(16, frames) codec codes of the latest reply (for tests and inspection)."""
        codes = self._last_audio.all_codes if self._last_audio is not None else []
        return torch.stack(codes, dim=1) if codes else torch.zeros(16, 0, dtype=torch.long)

    # ----- listening ---------------------------------------------------------------------------

    def _open_turn(self) -> None:
        self._closed = None  # the last reply can no longer be truncated
        if self._prompt_stale:
            self._rebuild()
        events = self._fit_context()
        self._pending_events = events
        self._turn_start_thinker = self.thinker.length
        self._turn_start_talker = self.talker.length
        self.listener.reset()
        self._open_audio = []
        self._turn_open = True
        self._listen_seconds = 0.0
        self._prefill_text(self.tokens.user_head(), user=True)

    def _reopen_turn(self) -> None:
        """The history again under the new system prompt, then the open turn's audio so far
        (its finished encoder windows, as they were prefilled)."""
        audio = self._open_audio
        self._rebuild()
        self._turn_start_thinker = self.thinker.length
        self._turn_start_talker = self.talker.length
        self._prefill_text(self.tokens.user_head(), user=True)
        for piece in audio:
            _, hidden = self.thinker.prefill(piece, hidden_layer=self.accept_layer)
            self.talker.extend_user(self.talker.project_hidden(hidden))

    def _prefill_audio(self, audio: torch.Tensor) -> None:
        """audio: (tokens, d) finished encoder output, prefilled into thinker and talker."""
        start = time.perf_counter()
        self._open_audio.append(audio)
        _, hidden = self.thinker.prefill(audio, hidden_layer=self.accept_layer)
        self.talker.extend_user(self.talker.project_hidden(hidden))
        sync(self.device)
        self._listen_seconds += time.perf_counter() - start

    def _prefill_text(self, ids: list[int], user: bool) -> torch.Tensor | None:
        """Prefill text ids into the thinker (and the talker's user part if `user`)."""
        if not ids:
            return None
        embeds = self.thinker.embed(ids)
        logits, _ = self.thinker.prefill(embeds)
        if user:
            self.talker.extend_user(self.talker.project_text(embeds))
        return logits

    # ----- speaking ----------------------------------------------------------------------------

    def _reply(self) -> Iterator[Event]:
        self._cancel.clear()
        clock = _Clock(self.device)
        if not self._turn_open:
            self._open_turn()
        elif self._prompt_stale:  # configured while the user was speaking: applies to this reply
            self._reopen_turn()
        yield from self._pending_events
        tail = self.listener.finish()
        clock.mark("encode_tail")
        if tail is not None:
            self._open_audio.append(tail)
        audio = torch.cat(self._open_audio) if self._open_audio else self.thinker.embed([])
        self.turns.append(_Turn(audio=audio))
        self._turn_open = False
        turn = self.turn_index
        self.turn_index += 1
        yield TurnStarted(turn=turn, user_audio_s=self.listener.mel_frames / 100)
        logits = self._prefill_end_of_turn(tail)
        clock.mark("prefill")
        yield from self._speak(turn, logits, clock)

    def _prefill_end_of_turn(self, tail: torch.Tensor | None) -> torch.Tensor:
        """One thinker pass over the audio tail (tokens, d), the user turn's closing tokens and
        the assistant header; returns the logits of the first reply token. The talker's share of
        the user part waits for `start_reply`, to go in the same pass as the assistant part."""
        closing = self.thinker.embed(self.tokens.user_tail())
        header = self.thinker.embed(self.tokens.assistant_head())
        audio = tail if tail is not None else closing[:0]
        logits, hidden = self.thinker.prefill(torch.cat([audio, closing, header]),
                                              hidden_layer=self.accept_layer)
        self._reply_start = self.thinker.length - header.shape[0]
        self._talker_user_tail = torch.cat([
            self.talker.project_hidden(hidden[:audio.shape[0]]), self.talker.project_text(closing)])
        return logits

    def _speak(self, turn: int, logits: torch.Tensor, clock: "_Clock") -> Iterator[Event]:
        """The reply's frames, text and audio packets.

        Each frame is launched before the host waits for the previous one: while the host reads
        a frame's code 0, voices packets and decodes text, the GPU already runs the next thinker
        token and frame. Their inputs never need the host (codes, sums and tokens stay on the
        GPU; what the host needs is copied back without waiting). Only a frame whose packet is
        due waits for its check first, so its audio does not queue behind the next frame. The
        frame launched after the last one and its token are dropped: the talker forgets the
        reply anyway, and the token never entered the thinker's cache (a step writes the token
        before the one it samples). The talker gets the text as generate() gives it (see
        `_ReplyState`): one token per frame, and in place of the reply's last token (its end
        token, or the one that reaches `max_reply_tokens`) the end of text. A reply cut at
        the frame cap keeps no token past its last frame, and nothing more is emitted once
        `cancel` is seen."""
        reply = _ReplyState(self.tokens.im_end, self.q.max_reply_tokens, self.tokenizer)
        token = self.thinker_sampler(logits)
        first = self._take_token(turn, reply, token, int(token))
        clock.mark("first_token", wait=False)  # before the view gets it: its time is not ours
        yield first
        self._last_audio = audio = _AudioOut(turn, self.q.first_packet_frames, self.q.packet_frames)
        if reply.done:  # no text for the talker: its only token is the last, never spoken
            self.talker.extend_user(self._talker_user_tail)
            yield from self._finish(turn, reply, clock, audio)
            return
        talker_logits, state = self.talker.start_reply(self._talker_user_tail,
                                                       self._assistant_part(reply.ids[0]))
        self.vocoder.reset()
        with clock.timed("talker"):
            frame = _Launched(*self.talker.frame(talker_logits, state, self.talker_sampler,
                                                 self.predictor_sampler))
        while not self._cancel.is_set():
            due = audio.due_with_one_more()
            ahead = None if due else self._launch_frame(reply, frame, audio.frames + 1, clock)
            if frame.code0.item() == self.codec_eos:  # the one wait per frame
                break
            audio.add(frame.codes)
            clock.mark("first_frame", wait=False)
            if due:
                with clock.timed("vocoder"):
                    voiced = audio.voice(self.vocoder.push)
                ahead = self._launch_frame(reply, frame, audio.frames, clock)
                packet = audio.emit(voiced)
                clock.mark("first_packet", wait=False)
                yield packet
            if ahead is None or self._cancel.is_set():  # as long as a reply may be, or cut off
                break
            if ahead.token is not None:
                yield self._take_token(turn, reply, ahead.token, ahead.token_id.item())
            frame = ahead
        if self._cancel.is_set():
            yield from self._interrupt(turn, reply)
            return
        with clock.timed("vocoder"):
            tail = audio.voice(self.vocoder.push) if audio.pending else None
            last = self.vocoder.flush()
        if tail is not None:
            yield audio.emit(tail)
        if (packet := audio.tail(last)) is not None:
            yield packet
        yield from self._finish(turn, reply, clock, audio)

    def _launch_frame(self, reply: "_ReplyState", previous: "_Launched", index: int,
                      clock: "_Clock") -> "_Launched | None":
        """Queue frame `index` (from `previous`) and, if the text has not ended, the thinker
        token it adds; None past the longest reply."""
        if index >= self.max_frames:
            return None
        token = token_id = None
        if not reply.done and index >= len(reply.ids):
            with clock.timed("thinker"):
                token = self.thinker_sampler(self.thinker.step(reply.tokens[-1]))
            token_id = _OnHost(token)
        with clock.timed("talker"):
            # Every token before this frame's has been read (the loop takes each before it
            # launches the next frame), so without a new token the text has ended: padding.
            text = self.tts_pad[0] if token is None else self._text_of_new_token(
                token, last=len(reply.ids) + 1 >= reply.limit)
            codes, codec_sum = self.talker.step_frame(previous.codec_sum + text,
                                                      self.talker_sampler, self.predictor_sampler)
            return _Launched(codes, codec_sum, token, token_id)

    def _finish(self, turn, reply, clock, audio: "_AudioOut") -> Iterator[Event]:
        kept = reply.text_ids()
        self._close_reply(kept)
        self._closed = reply, audio.frames
        clock.summary(len(reply.ids), audio.frames, self._listen_seconds)
        yield StageTimings(turn, **clock.stages)
        yield TurnFinished(turn, self._decode(kept), tuple(kept), audio.samples,
                           "eos" if reply.ended_by_eos else "max_tokens")

    def _interrupt(self, turn: int, reply: "_ReplyState") -> Iterator[Event]:
        heard_frames = frames_heard(self._heard_samples, self.vocoder.samples_per_frame)
        kept = reply.spoken(heard_frames)
        self._close_reply(kept)
        self._closed = reply, heard_frames
        self._cancel.clear()
        yield Interrupted(turn, self._heard_samples, self._decode(kept))

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def _close_reply(self, kept: list[int]) -> None:
        """History keeps `<|im_start|>assistant\\n{kept}<|im_end|>\\n`; the talker forgets the reply."""
        self.talker.end_reply()
        content_start = self._reply_start + len(self.tokens.assistant_head())
        cached = min(len(kept), self.thinker.length - content_start)
        self.thinker.crop(content_start + cached)
        self._prefill_text(kept[cached:] + self.tokens.assistant_tail(), user=False)
        self.turns[-1].reply_ids = list(kept)

    def _take_token(self, turn: int, reply: "_ReplyState", token: torch.Tensor,
                    token_id: int) -> TextDelta:
        """Add a token (its tensor and its id, read on the host: the view needs the text)."""
        return TextDelta(turn, reply.add(token_id, token), (token_id,))

    # ----- talker inputs (as generate() builds them) -----------------------------------------

    def _assistant_part(self, first_token: int) -> torch.Tensor:
        """(9, d_talker): `<|im_start|>assistant\\n` + 4 pads + bos + first token, with codec
        specials (none, none, none, nothink, think_bos, think_eos, speaker, pad, bos) added."""
        head = self.talker.project_text(self.thinker.embed(self.tokens.assistant_head()))
        first = self.talker.project_text(self.thinker.embed([first_token]))
        text = torch.cat([head, self.tts_pad.expand(4, -1), self.tts_bos, first])
        tc = self.config.talker_config
        specials = [tc.codec_nothink_id, tc.codec_think_bos_id, tc.codec_think_eos_id,
                    self.speaker_id, tc.codec_pad_id, tc.codec_bos_id]
        codec = self.talker.codec_embed(torch.tensor(specials, device=self.device))
        codec = torch.cat([codec.new_zeros(3, codec.shape[1]), codec])
        return text + codec

    def _text_of_new_token(self, token: torch.Tensor, last: bool) -> torch.Tensor:
        """Text for the frame launched with a token just sampled (0-d, on the device): its
        talker embedding, or tts_eos where it is the reply's last token. `last`: the token
        reaches `max_reply_tokens` (the host knows). Whether it is the end token only the
        device knows yet: decided there, so the launch does not wait for the sampler. (d,)"""
        if last:
            return self.tts_eos[0]
        return torch.where(token == self.tokens.im_end, self.tts_eos[0], self._project_token(token))

    def _project_token(self, token: torch.Tensor) -> torch.Tensor:
        """0-d token id on the device -> its talker text embedding (d,); no host copy."""
        return self.talker.project_text(self.thinker.embed(token.view(1)))[0]

    def _tts_embeds(self) -> None:
        c = self.config
        ids = [c.tts_bos_token_id, c.tts_eos_token_id, c.tts_pad_token_id]
        projected = self.talker.project_text(self.thinker.embed(ids))
        self.tts_bos, self.tts_eos, self.tts_pad = projected[0:1], projected[1:2], projected[2:3]

    def _speaker_id(self, voice: str) -> int:
        return self.config.talker_config.speaker_id[pick_voice(voice, self.voices()).lower()]

    def _system_ids(self) -> list[int]:
        return self.tokens.system_ids(self.tokenizer, self.system_prompt)

    # ----- long conversations -----------------------------------------------------------------

    def _fit_context(self) -> list[Event]:
        """Before a new turn: if the context could overflow, drop the oldest turns and re-prefill."""
        reserve = self.q.max_reply_tokens + self._turn_budget_tokens()
        if self.thinker.length + reserve <= self.max_context or not self.turns:
            return []
        dropped = 0
        while self.turns and self._history_length(self.turns) + reserve > self.max_context:
            self.turns.pop(0)
            dropped += 1
        self._rebuild()
        return [HistoryTrimmed(dropped_turns=dropped, kept_tokens=self.thinker.length)]

    def _turn_budget_tokens(self) -> int:
        """Room kept for the coming user turn: 60 s of audio at 13 tokens per second."""
        return 60 * 13 + 16

    def _history_length(self, turns: list[_Turn]) -> int:
        t = self.tokens
        fixed = len(self._system_ids())
        per_turn = len(t.user_head()) + len(t.user_tail()) + len(t.assistant_head()) + 2
        return fixed + sum(per_turn + turn.audio.shape[0] + len(turn.reply_ids) for turn in turns)

    def _rebuild(self) -> None:
        """Prefill the system prompt and the kept turns again, from stored audio embeddings."""
        turns = self.turns
        self._prompt_stale = False
        self.thinker.reset()
        self.talker.reset()
        self._prefill_text(self._system_ids(), user=False)
        for turn in turns:
            self._prefill_text(self.tokens.user_head(), user=True)
            if turn.audio.shape[0]:
                _, hidden = self.thinker.prefill(turn.audio, hidden_layer=self.accept_layer)
                self.talker.extend_user(self.talker.project_hidden(hidden))
            self._prefill_text(self.tokens.user_tail(), user=True)
            ids = self.tokens.assistant_head() + turn.reply_ids + self.tokens.assistant_tail()
            self._prefill_text(ids, user=False)


# What a reply changes besides the caches, the listener and the random state (`checkpoint`).
_TURN_FIELDS = ("turns", "_closed", "turn_index", "_open_audio", "_turn_open", "_pending_events",
                "_turn_start_thinker", "_turn_start_talker", "_listen_seconds", "_last_audio",
                "_heard_samples")


@dataclass(frozen=True)
class Checkpoint:
    """A conversation's state before a speculative reply (`StreamingConversation.checkpoint`)."""

    thinker_length: int
    talker_length: int
    talker_user_length: int
    listener: tuple  # Listener.state()
    rng: tuple  # the samplers' generator's state and the device's default generator's
    fields: dict  # _TURN_FIELDS' values (lists copied)


def _rng_states(generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """The conversation's generator's state and its device's default generator's: the samplers
    inside CUDA graphs draw from the latter (`Sampler.graph_safe`)."""
    if generator.device.type == "cuda":
        return generator.get_state(), torch.cuda.get_rng_state(generator.device)
    return generator.get_state(), torch.get_rng_state()


def _set_rng_states(generator: torch.Generator, states: tuple[torch.Tensor, torch.Tensor]) -> None:
    own, default = states
    generator.set_state(own)
    if generator.device.type == "cuda":
        torch.cuda.set_rng_state(default, generator.device)
    else:
        torch.set_rng_state(default)


class _ReplyState:
    """The reply's text ids as the thinker writes them, and its text decoded incrementally.

    What the talker is given follows generate(), which feeds the talker the thinker's input
    embeddings: every generated token but the last is an input to the thinker, the last never
    is (generation stops after sampling it). So frame 0 gets token 0, frame k token k while
    k < `fed`, frame `fed` the end of text (tts_eos) and later frames tts_pad, where `fed` is
    the number of tokens minus one once the reply's text has ended, by its end token or by
    `max_reply_tokens` alike."""

    def __init__(self, eos: int, limit: int, tokenizer):
        self.eos, self.limit, self.tokenizer = eos, limit, tokenizer
        self.ids: list[int] = []
        self.tokens: list[torch.Tensor] = []  # the same ids as the sampler's 0-d device tensors
        self.done = self.ended_by_eos = False
        self._shown = ""

    def add(self, token_id: int, token: torch.Tensor) -> str:
        """Record a token (its id and its tensor); returns the new text it completes ("" while a
        character is partial)."""
        self.ids.append(token_id)
        self.tokens.append(token)
        if token_id == self.eos:
            self.done = self.ended_by_eos = True
        elif len(self.ids) >= self.limit:
            self.done = True
        text = self.tokenizer.decode(self.text_ids(), skip_special_tokens=True)
        if text.endswith("\ufffd") and not self.done:
            return ""
        new, self._shown = text[len(self._shown):], text
        return new

    def text_ids(self) -> list[int]:
        return self.ids[:-1] if self.ended_by_eos else list(self.ids)

    @property
    def fed(self) -> int:
        """Tokens the talker is given (so far): all but the last once the text has ended."""
        return len(self.ids) - 1 if self.done else len(self.ids)

    def spoken(self, frames: int) -> list[int]:
        """Text ids the talker was given in the reply's first `frames` frames: what a listener
        who heard that many frames heard."""
        return self.ids[:min(frames, self.fed)]


class _AudioOut:
    """Codec frames of the reply waiting for the vocoder, and the packets made of them."""

    def __init__(self, turn: int, first_packet_frames: int, packet_frames: int):
        self.turn = turn
        self.first, self.every = first_packet_frames, packet_frames
        self.pending: list[torch.Tensor] = []  # (16,) codes per frame, not yet voiced
        self.all_codes: list[torch.Tensor] = []
        self.frames = 0  # frames made so far
        self.samples = 0  # samples emitted so far
        self.packets = 0

    def add(self, codes: torch.Tensor) -> None:
        self.pending.append(codes)
        self.all_codes.append(codes)
        self.frames += 1

    def due_with_one_more(self) -> bool:
        """Whether a packet is due once one more frame is added."""
        return len(self.pending) + 1 >= (self.first if self.packets == 0 else self.every)

    def voice(self, push) -> tuple["_OnHost", int]:
        """Queue the pending frames through `push` (the vocoder); (samples on their way to the
        host, frames) for `emit`."""
        codes = torch.stack(self.pending, dim=1)  # (16, n)
        frames, self.pending = len(self.pending), []
        return _OnHost(push(codes).float()), frames

    def emit(self, voiced: tuple["_OnHost", int]) -> AudioPacket:
        samples, frames = voiced
        return self._emit(samples.tensor(), frames)

    def tail(self, samples: torch.Tensor) -> AudioPacket | None:
        return self._emit(samples.float().cpu(), 0) if samples.numel() else None

    def _emit(self, samples: torch.Tensor, frames: int) -> AudioPacket:
        out = samples.numpy()
        packet = AudioPacket(self.turn, out, self.samples, frames)
        self.samples += out.shape[0]
        self.packets += 1
        return packet


class _OnHost:
    """A device tensor on its way to the host: the copy is queued now and waited for (alone) on
    first use, so GPU work queued after it keeps running meanwhile."""

    def __init__(self, tensor: torch.Tensor):
        self._ready = None
        if tensor.is_cuda:
            self._tensor = tensor.to("cpu", non_blocking=True)  # into pinned memory
            self._ready = torch.cuda.Event()
            self._ready.record(torch.cuda.current_stream(tensor.device))  # where the copy runs
        else:
            self._tensor = tensor

    def tensor(self) -> torch.Tensor:
        if self._ready is not None:
            self._ready.synchronize()
            self._ready = None
        return self._tensor

    def item(self) -> int:
        return int(self.tensor())


class _Launched:
    """A frame queued on the device: codes (16,) long, summed codec embeddings (d,), code 0 on
    its way to the host; and the thinker token queued with it (0-d long), if any."""

    def __init__(self, codes: torch.Tensor, codec_sum: torch.Tensor,
                 token: torch.Tensor | None = None, token_id: "_OnHost | None" = None):
        self.codes, self.codec_sum = codes, codec_sum
        self.code0 = _OnHost(codes[0])
        self.token, self.token_id = token, token_id


class _Clock:
    """Stage marks in ms since the end of the user's turn, and time spent per stage.

    On the GPU a stage's time is measured between CUDA events recorded around its work on the
    stream, read once when the reply ends: timing adds no host sync, so the GPU can run ahead of
    the Python loop as it does without a clock. The span includes any wait of the GPU for the
    host's launches inside the stage (none when the stage was queued behind earlier work), and
    the work of a frame dropped at the end of a reply. Marks wait for the GPU where the host
    has not just read the result they mark; each is taken once per reply."""

    STAGES = ("thinker", "talker", "vocoder")

    def __init__(self, device: torch.device):
        self.device = device
        self.cuda = device.type == "cuda"
        self.start = time.perf_counter()
        self.stages: dict[str, float] = {}
        self.spent: dict[str, float] = dict.fromkeys(self.STAGES, 0.0)  # seconds
        self._events: dict[str, list] = {stage: [] for stage in self.STAGES}

    def mark(self, name: str, wait: bool = True) -> None:
        """Note when `name` first happened; `wait`: for the GPU's queued work first (not when
        the host has just read the result that marks it, with later work queued behind)."""
        if name not in self.stages:
            if wait:
                sync(self.device)
            self.stages[name] = 1000 * (time.perf_counter() - self.start)

    @contextlib.contextmanager
    def timed(self, stage: str):
        """Time the work queued in the block (on the CPU, where work is synchronous: the block)."""
        if self.cuda:
            stream = torch.cuda.current_stream(self.device)
            began, ended = (torch.cuda.Event(enable_timing=True) for _ in range(2))
            began.record(stream)
            yield
            ended.record(stream)
            self._events[stage].append((began, ended))
            return
        began = time.perf_counter()
        try:
            yield
        finally:
            self.spent[stage] += time.perf_counter() - began

    def _read_events(self) -> None:
        sync(self.device)
        for stage, pairs in self._events.items():
            self.spent[stage] += sum(a.elapsed_time(b) for a, b in pairs) / 1000
            pairs.clear()

    def summary(self, tokens: int, frames: int, listen_seconds: float) -> None:
        self.mark("total")
        self._read_events()
        self.stages["thinker_ms_per_token"] = 1000 * self.spent["thinker"] / max(1, tokens - 1)
        self.stages["talker_ms_per_frame"] = 1000 * self.spent["talker"] / max(1, frames)
        self.stages["vocoder_ms_per_frame"] = 1000 * self.spent["vocoder"] / max(1, frames)
        self.stages["listen_ms"] = 1000 * listen_seconds
        self.stages["reply_tokens"] = tokens
        self.stages["reply_frames"] = frames


@contextlib.contextmanager
def open_conversation(settings: Settings, progress: Callable[[str], None] | None = None,
                      bundle: ModelBundle | None = None) -> Iterator[StreamingConversation]:
    """Load the model (unless `bundle` is given) and yield a fresh conversation."""
    bundle = bundle or load_model(settings.qwen, progress)
    conversation = StreamingConversation(bundle, settings)
    try:
        yield conversation
    finally:
        conversation.cancel(0)
