"""The streaming engine against the reference: transformers' own generate() on the same history.

Tiny random checkpoint, float32, CPU, greedy everywhere, the same encoder window for both. The
engine must give the same reply ids and codec codes, and a waveform equal to code2wav run on
those codes in one piece (to 1e-4), for 1 s and 2 s windows, one and two turns, packet sizes 1, 2
and 4 frames, after a cancel, and whatever chunk sizes the audio arrives in.

generate() is fed the features the engine's streaming mel extractor made (see test_features.py
for how those differ from the offline extractor's).
"""

from __future__ import annotations

import contextlib
import time

import numpy as np
import pytest
import torch

from duplex_chat.audio.features import StreamingMel
from duplex_chat.model.bench import synthetic_voice
from duplex_chat.model.engine import StreamingConversation
from duplex_chat.model.events import (
    AudioPacket,
    HistoryTrimmed,
    Interrupted,
    StageTimings,
    TextDelta,
    TurnFinished,
)
from duplex_chat.model.reference import reference_reply

from .conftest import tiny_settings

MAX_TOKENS = 10
MAX_FRAMES = 14
RATE = 16_000


def user_audio(seconds: float, seed: int) -> np.ndarray:
    """Speech-like test audio (the benchmark's synthetic voice)."""
    return synthetic_voice(seconds, seed)


def mel_of(audio: np.ndarray) -> torch.Tensor:
    mel = StreamingMel()
    return torch.cat([mel.feed(audio), mel.finish()], dim=1)


def make_conversation(bundle, checkpoint, window_s, packet_frames=4, first=1, decoder="eager",
                      max_tokens=MAX_TOKENS, **qwen):
    settings = tiny_settings(checkpoint, encoder_window_s=window_s, max_reply_tokens=max_tokens,
                             decoder=decoder, **qwen,
                             packet_frames=packet_frames, first_packet_frames=first,
                             max_reply_seconds=MAX_FRAMES / 12.5)
    conv = StreamingConversation(bundle, settings, seed=0)
    assert conv.max_frames == MAX_FRAMES
    return conv, settings


def run_turn(conv, audio, chunk, cancel_after_packets=None, heard=0):
    """Feed `audio` in `chunk`-sample pieces, end the turn; returns (ids, waveform, events)."""
    for start in range(0, len(audio), chunk):
        conv.feed(audio[start:start + chunk])
    ids, packets, events = [], [], []
    for event in conv.end_turn():
        events.append(event)
        if isinstance(event, TextDelta):
            ids.extend(event.token_ids)
        elif isinstance(event, AudioPacket):
            assert event.start_sample == sum(p.shape[0] for p in packets)
            packets.append(event.samples)
            if cancel_after_packets is not None and len(packets) == cancel_after_packets:
                conv.cancel(heard)
    wave = np.concatenate(packets) if packets else np.zeros(0, np.float32)
    return ids, wave, events


def one_piece(bundle, codes: torch.Tensor) -> np.ndarray:
    with torch.inference_mode():
        return bundle.model.code2wav(codes[None])[0, 0].float().cpu().numpy()


def assert_matches_reference(bundle, settings, conv, ids, wave, features, replies, choices=None):
    """The same reply ids and codes as generate(); with `choices` (see `_record_choices`) the
    codes may part at a near tie. The streamed waveform equals code2wav on the codes in one piece."""
    ref_logits: list[list[torch.Tensor]] = []
    with _predictor_logits(bundle.model, ref_logits):
        ref = reference_reply(bundle, settings.qwen, features, replies, max_frames=MAX_FRAMES)
    assert ids == ref.reply_ids
    assert ref.codes is not None and ref.codes.shape[1] > 0
    frames = ref.codes.shape[1]
    caught = torch.stack([torch.stack(book[:frames]).argmax(-1) for book in ref_logits])
    assert torch.equal(caught.to(ref.codes.device), ref.codes[1:])  # the hooks read it right
    if choices is None:
        assert torch.equal(conv.last_codes, ref.codes)
    else:
        assert_codes_equal_up_to_a_near_tie(conv.last_codes, ref.codes, choices, ref_logits)
    expected = one_piece(bundle, conv.last_codes)
    assert wave.shape == expected.shape
    assert np.abs(wave - expected).max() < 1e-4


@pytest.mark.parametrize("window_s,decoder", [(1.0, "eager"), (2.0, "eager"), (1.0, "fast")])
def test_single_turn_equals_generate(tiny_bundle, tiny_checkpoint, window_s, decoder):
    conv, settings = make_conversation(tiny_bundle, tiny_checkpoint, window_s, decoder=decoder)
    audio = user_audio(3.3, seed=1)
    ids, wave, events = run_turn(conv, audio, chunk=5120)
    assert isinstance(events[-1], TurnFinished)
    assert_stage_timings_sane(events)
    assert_matches_reference(tiny_bundle, settings, conv, ids, wave, [mel_of(audio)], [])


def assert_stage_timings_sane(events) -> None:
    """A reply's StageTimings: its marks in order, every stage's cost positive, and all the
    stages' time together within the reply's."""
    stages = next(e.stages for e in events if isinstance(e, StageTimings))
    marks = [stages[k] for k in ("encode_tail", "prefill", "first_token", "first_frame",
                                 "first_packet", "total")]
    assert 0 <= marks[0] and marks == sorted(marks)
    costs = ("thinker_ms_per_token", "talker_ms_per_frame", "vocoder_ms_per_frame")
    assert all(stages[k] > 0 for k in costs)
    spent = (stages["thinker_ms_per_token"] * (stages["reply_tokens"] - 1)
             + (stages["talker_ms_per_frame"] + stages["vocoder_ms_per_frame"])
             * stages["reply_frames"])
    assert spent < stages["total"] - stages["first_token"]


@pytest.mark.parametrize("window_s,decoder", [(1.0, "eager"), (2.0, "eager"), (2.0, "fast")])
def test_two_turns_equal_generate(tiny_bundle, tiny_checkpoint, window_s, decoder):
    conv, settings = make_conversation(tiny_bundle, tiny_checkpoint, window_s, decoder=decoder)
    assert_two_turns_match_reference(tiny_bundle, settings, conv)


def assert_two_turns_match_reference(bundle, settings, conv) -> None:
    first, second = user_audio(2.4, seed=2), user_audio(1.7, seed=3)
    _, _, events = run_turn(conv, first, chunk=4000)
    reply1 = list(events[-1].token_ids)
    choices = _record_choices(conv)
    ids, wave, _ = run_turn(conv, second, chunk=4000)
    assert_matches_reference(bundle, settings, conv, ids, wave,
                             [mel_of(first), mel_of(second)], [reply1], choices)


@pytest.mark.parametrize("packet_frames", [1, 2, 4])
def test_packet_sizes_tile_the_waveform(tiny_bundle, tiny_checkpoint, packet_frames):
    conv, _ = make_conversation(tiny_bundle, tiny_checkpoint, 1.0, packet_frames, first=1)
    ids, wave, events = run_turn(conv, user_audio(1.5, seed=4), chunk=8000)
    packets = [e for e in events if isinstance(e, AudioPacket)]
    assert packets[0].frames == 1
    assert all(p.frames in (packet_frames, 0) for p in packets[1:-1])
    expected = one_piece(tiny_bundle, conv.last_codes)
    assert wave.shape == expected.shape
    assert np.abs(wave - expected).max() < 1e-4


def test_cancel_then_continue_equals_generate_on_truncated_history(tiny_bundle, tiny_checkpoint):
    conv, settings = make_conversation(tiny_bundle, tiny_checkpoint, 1.0, packet_frames=2)
    first, second = user_audio(2.2, seed=5), user_audio(1.4, seed=6)
    heard = 3 * 1920 + 100  # a bit into the fourth frame
    _, _, events = run_turn(conv, first, chunk=3000, cancel_after_packets=2, heard=heard)
    interrupted = events[-1]
    assert isinstance(interrupted, Interrupted)
    assert interrupted.heard_samples == heard
    cut = [i for i, e in enumerate(events) if isinstance(e, AudioPacket)][1]  # cancelled here
    assert not any(isinstance(e, (TextDelta, AudioPacket)) for e in events[cut + 1:-1])
    kept = conv.turns[-1].reply_ids
    assert len(kept) <= 4
    conv.cancel(0)  # between turns: harmless
    conv.cancel(0)
    ids, wave, _ = run_turn(conv, second, chunk=3000)
    assert_matches_reference(tiny_bundle, settings, conv, ids, wave,
                             [mel_of(first), mel_of(second)], [kept])


@pytest.mark.parametrize("decoder", ["eager", "fast"])
def test_speech_ending_before_the_text_drops_the_frame_launched_ahead(tiny_bundle, tiny_checkpoint,
                                                                      decoder):
    """The talker ends the reply (codec end at frame 5) while the thinker still has text: the
    frame and the token launched before that frame was checked are dropped, the reply is the
    unended one's first 5 frames and 6 tokens, and the next turn is generate()'s on it."""
    first, second = user_audio(2.4, seed=2), user_audio(1.7, seed=3)
    unended, _ = make_conversation(tiny_bundle, tiny_checkpoint, 1.0, decoder=decoder)
    full_ids, _, _ = run_turn(unended, first, chunk=4000)
    full_codes = unended.last_codes
    assert len(full_ids) == MAX_TOKENS and full_codes.shape[1] == MAX_FRAMES

    conv, settings = make_conversation(tiny_bundle, tiny_checkpoint, 1.0, decoder=decoder)
    step_frame, calls = conv.talker.step_frame, []

    def ending_at_frame_5(*args):  # frame 0 comes from `frame`, frames 1.. from here
        codes, codec_sum = step_frame(*args)
        calls.append(1)
        if len(calls) == 5:
            codes = codes.clone()
            codes[0] = conv.codec_eos
        return codes, codec_sum

    conv.talker.step_frame = ending_at_frame_5
    ids, wave, events = run_turn(conv, first, chunk=4000)
    del conv.talker.step_frame
    assert len(calls) == 6  # frame 6 was launched ahead of frame 5's check
    assert isinstance(events[-1], TurnFinished)
    assert ids == full_ids[:6] and list(events[-1].token_ids) == ids
    assert torch.equal(conv.last_codes, full_codes[:, :5])
    expected = one_piece(tiny_bundle, conv.last_codes)  # no sound of the dropped frame
    assert wave.shape == expected.shape and np.abs(wave - expected).max() < 1e-4

    choices = _record_choices(conv)
    ids, wave, _ = run_turn(conv, second, chunk=4000)
    assert_matches_reference(tiny_bundle, settings, conv, ids, wave,
                             [mel_of(first), mel_of(second)], [full_ids[:6]], choices)


def test_a_reply_cut_at_the_frame_cap_keeps_the_text_it_spoke(tiny_bundle, tiny_checkpoint):
    """More text than frames: the reply stops at MAX_FRAMES with one token per frame (the text
    the talker was given; no token is sampled past the last frame), generate()'s first tokens
    and codes, and the history keeps just that text."""
    conv, settings = make_conversation(tiny_bundle, tiny_checkpoint, 1.0,
                                       max_tokens=MAX_FRAMES + 10)
    audio = user_audio(2.4, seed=2)
    ids, _, events = run_turn(conv, audio, chunk=4000)
    ref = reference_reply(tiny_bundle, settings.qwen, [mel_of(audio)], [], max_frames=MAX_FRAMES)
    assert len(ref.reply_ids) > MAX_FRAMES
    assert ids == ref.reply_ids[:MAX_FRAMES]
    assert torch.equal(conv.last_codes, ref.codes[:, :MAX_FRAMES])
    assert list(events[-1].token_ids) == ids and conv.turns[-1].reply_ids == ids


def test_marks_do_not_count_the_time_the_listener_spends_on_events(tiny_bundle,
                                                                    tiny_checkpoint):
    """`first_token` and `first_packet` are taken before their events are handed over: a slow
    consumer (a view, a player) does not move them."""
    conv, _ = make_conversation(tiny_bundle, tiny_checkpoint, 1.0)
    conv.feed(user_audio(1.2, seed=8))
    received, stages = {}, {}
    for event in conv.end_turn():
        kind = {TextDelta: "first_token", AudioPacket: "first_packet"}.get(type(event))
        if kind and kind not in received:
            received[kind] = time.perf_counter()
            time.sleep(0.3)
        elif isinstance(event, StageTimings):
            stages = event.stages
    apart_here = 1000 * (received["first_packet"] - received["first_token"])
    apart_there = stages["first_packet"] - stages["first_token"]
    assert abs(apart_here - apart_there) < 150  # a mark after the handover would be 300 off


def test_chunk_sizes_do_not_change_the_reply(tiny_bundle, tiny_checkpoint):
    audio = user_audio(1.3, seed=7)
    results = []
    for chunk in (1, 317, 5 * RATE):
        conv, _ = make_conversation(tiny_bundle, tiny_checkpoint, 1.0)
        ids, wave, _ = run_turn(conv, audio, chunk)
        results.append((ids, conv.last_codes, wave))
    for ids, codes, wave in results[1:]:
        assert ids == results[0][0]
        assert torch.equal(codes, results[0][1])
        assert np.array_equal(wave, results[0][2])


def test_long_conversation_drops_oldest_turns_and_stays_exact(tiny_bundle, tiny_checkpoint):
    """When the next turn would not fit, the oldest turns go, the rest is prefilled again, and
    the reply still equals generate() on the history that was kept: the same text, and the same
    codes up to a near tie (see NEAR_TIE)."""
    conv, settings = make_conversation(tiny_bundle, tiny_checkpoint, 1.0)
    conv.max_context = 150  # a tiny context, so that a few turns overflow it
    conv._turn_budget_tokens = lambda: 20  # room kept for a 1-2 s turn
    audios = [user_audio(1.2 + 0.1 * i, seed=20 + i) for i in range(4)]
    replies, trimmed = [], []
    for audio in audios[:-1]:
        _, _, events = run_turn(conv, audio, chunk=4000)
        replies.append(list(events[-1].token_ids))
        trimmed += [e for e in events if isinstance(e, HistoryTrimmed)]
        # bounded: what fits plus at most one turn's overshoot of the room kept for it
        assert conv.thinker.length <= conv.max_context + 40
    choices = _record_choices(conv)
    ids, wave, events = run_turn(conv, audios[-1], chunk=4000)
    trimmed += [e for e in events if isinstance(e, HistoryTrimmed)]
    assert trimmed and sum(e.dropped_turns for e in trimmed) >= 1
    kept = len(conv.turns) - 1  # earlier turns still in the history
    assert kept < len(audios) - 1
    assert_matches_reference(tiny_bundle, settings, conv, ids, wave,
                             [mel_of(a) for a in audios[-kept - 1:]],
                             replies[len(replies) - kept:], choices)


# Closer than this, greedy's choice is up to rounding: prefilling the history in other pieces than
# generate() does swapped two best codes 5.6e-4 apart (a second turn's frame 9, codebook 2; both
# engine decoders agree with each other there) and, before the tiny model's talker MoE was
# initialised, 4.6e-4 apart (frame 10's code 0 after a history rebuild, the third 0.047 behind).
NEAR_TIE = 1e-3


def test_a_near_tie_is_judged_by_generates_logits_without_sampler_notes():
    codes = torch.tensor([[5, 6], [1, 2], [3, 4]])  # (books, frames)
    ref = codes.clone()
    ref[2, 1] = 9  # frame 1, codebook 2
    logits = [[torch.zeros(10), torch.zeros(10)] for _ in range(2)]
    logits[1][1][9], logits[1][1][4] = 1.0, 1.0 - NEAR_TIE / 2  # generate()'s top two
    assert_codes_equal_up_to_a_near_tie(codes, ref, [], logits)
    logits[1][1][4] = 1.0 - 2 * NEAR_TIE  # not near
    with pytest.raises(AssertionError):
        assert_codes_equal_up_to_a_near_tie(codes, ref, [], logits)
    logits[1][1][4], logits[1][1][3] = 1.0 - NEAR_TIE / 2, 1.0 - NEAR_TIE / 4  # 4 only third
    with pytest.raises(AssertionError):
        assert_codes_equal_up_to_a_near_tie(codes, ref, [], logits)
    ref[0, 1] = 7  # code 0 differs first: its logits are processed, so no judging by them
    with pytest.raises(AssertionError, match="no sampler notes"):
        assert_codes_equal_up_to_a_near_tie(codes, ref, [], logits)


class _Spy:
    """A sampler that notes, per call, (runner-up id, its distance to the best) before sampling."""

    def __init__(self, sampler, notes: list):
        self.sampler, self.notes = sampler, notes

    def __getattr__(self, name):  # graph_safe() and the rest: the real sampler's (not noted)
        return getattr(self.sampler, name)

    def __call__(self, logits, **kwargs):
        top = self.sampler._penalized(logits, kwargs.get("seen")).topk(2)
        self.notes.append((int(top.indices[1]), float(top.values[0] - top.values[1])))
        return self.sampler(logits, **kwargs)


def _record_choices(conv) -> list[tuple[int, float]]:
    """Spy on the talker's and the code predictor's samplers from now on: entry 16 f + k is frame
    f's codebook k (the talker picks code 0, then the predictor codes 1-15)."""
    notes: list[tuple[int, float]] = []
    conv.talker_sampler = _Spy(conv.talker_sampler, notes)
    conv.predictor_sampler = _Spy(conv.predictor_sampler, notes)
    return notes


@contextlib.contextmanager
def _predictor_logits(model, sink: list):
    """While inside, catch generate()'s code-predictor logits: sink[k - 1][f] is frame f's
    codebook k (vocab,). Each frame calls each codebook's head once, in frame order."""
    heads = model.talker.code_predictor.lm_head
    sink[:] = [[] for _ in heads]
    hooks = [head.register_forward_hook(
        lambda _module, _inputs, out, seen=seen: seen.append(out[0, -1].float()))
        for head, seen in zip(heads, sink)]
    try:
        yield sink
    finally:
        for hook in hooks:
            hook.remove()


def assert_codes_equal_up_to_a_near_tie(codes, ref_codes, choices, ref_logits) -> None:
    """Equal codes (16, frames), or equal up to the first code that differs, where generate()
    took the engine's runner-up of a near tie: by the engine's sampler notes, or, where its
    samplers ran inside a CUDA graph and noted nothing, by generate()'s logits (the engine took
    generate()'s runner-up; codebooks 1-15, whose greedy choice is a plain argmax)."""
    frames = min(codes.shape[1], ref_codes.shape[1])
    differ = (codes[:, :frames] != ref_codes[:, :frames]).T.flatten().nonzero()  # frame-major
    if not len(differ):
        return
    first = int(differ[0])
    frame, book = divmod(first, codes.shape[0])
    if first < len(choices):
        runner_up, margin = choices[first]
        assert int(ref_codes[book, frame]) == runner_up and margin < NEAR_TIE, (frame, book,
                                                                                margin)
        return
    assert book > 0 and frame < len(ref_logits[book - 1]), (
        f"frame {frame} codebook {book} differs; no sampler notes")
    top = ref_logits[book - 1][frame].topk(2)
    margin = float(top.values[0] - top.values[1])
    assert int(top.indices[0]) == int(ref_codes[book, frame])  # these logits are this code's
    assert int(codes[book, frame]) == int(top.indices[1]) and margin < NEAR_TIE, (frame, book,
                                                                                  margin)
