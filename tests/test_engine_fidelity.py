"""The streaming engine against the reference: transformers' own generate() on the same history.

Both tiny random checkpoints (`any_tiny`: two shapes), float32, CPU, greedy everywhere, the same
encoder window for both. Every reply token and every codec code must be generate()'s, and the
streamed waveform generate()'s to 1e-4; a difference passes only as a tie decided by rounding,
judged as `tests/fidelity.py` says. Covered: replies whose text ends by `<|im_end|>` (forced by
a logit bias), by `max_reply_tokens`, and cut by `max_reply_seconds`; speech ending before the
text and the reverse; one to three turns; cancel and go on; history trimming; the eager and
the fast decoder (its CUDA graphs in tests/test_gpu.py).

generate() is fed the features the engine's streaming mel extractor made (see test_features.py
for how those differ from the offline extractor's).
"""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch

from duplex_chat.model.engine import StreamingConversation
from duplex_chat.model.events import (
    AudioPacket,
    HistoryTrimmed,
    Interrupted,
    StageTimings,
    TextDelta,
    TurnFinished,
)

from .conftest import tiny_settings
from .fidelity import (
    INPUTS_AGREE,
    TIE_MARGIN,
    Judge,
    Reference,
    assert_same_reply,
    judged_turn,
    mel_of,
    run_turn,
    steered,
    steering,
    user_audio,
)

MAX_TOKENS = 10
MAX_FRAMES = 14  # longer than both tiny vocoders' attention windows (4 and 6 frames)


def make_conversation(bundle, checkpoint, window_s, packet_frames=4, first=1, decoder="eager",
                      max_tokens=MAX_TOKENS, **qwen):
    settings = tiny_settings(checkpoint, encoder_window_s=window_s, max_reply_tokens=max_tokens,
                             decoder=decoder, **qwen,
                             packet_frames=packet_frames, first_packet_frames=first,
                             max_reply_seconds=MAX_FRAMES / 12.5)
    conv = StreamingConversation(bundle, settings, seed=0)
    assert conv.max_frames == MAX_FRAMES
    return conv, settings


@pytest.mark.parametrize("window_s,decoder", [(1.0, "eager"), (2.0, "eager"), (1.0, "fast")])
def test_single_turn_equals_generate(any_tiny, window_s, decoder):
    """Text ended by max_reply_tokens (10 tokens, 14 frames): the talker is given token 9's
    place as the end of text, as generate() gives it."""
    checkpoint, bundle = any_tiny
    conv, settings = make_conversation(bundle, checkpoint, window_s, decoder=decoder)
    turn = judged_turn(conv, settings, user_audio(3.3, seed=1), [], [], chunk=5120)
    assert isinstance(turn.events[-1], TurnFinished) and turn.events[-1].reason == "max_tokens"
    assert len(turn.ids) == MAX_TOKENS and turn.ref.frames == MAX_FRAMES
    assert_same_reply(conv, turn)
    assert_stage_timings_sane(turn.events)


def assert_stage_timings_sane(events) -> None:
    """A reply's StageTimings: its marks in order, every stage's cost positive, and all the
    stages' time together within the reply's."""
    s = next(e for e in events if isinstance(e, StageTimings))
    marks = [s.encode_tail, s.prefill, s.first_token, s.first_frame, s.first_packet, s.total]
    assert 0 <= marks[0] and marks == sorted(marks)
    assert s.thinker_ms_per_token > 0 and s.talker_ms_per_frame > 0 and s.vocoder_ms_per_frame > 0
    spent = (s.thinker_ms_per_token * (s.reply_tokens - 1)
             + (s.talker_ms_per_frame + s.vocoder_ms_per_frame) * s.reply_frames)
    assert spent < s.total - s.first_token


@pytest.mark.parametrize("decoder", ["eager", "fast"])
def test_three_turns_equal_generate(any_tiny, decoder):
    checkpoint, bundle = any_tiny
    conv, settings = make_conversation(bundle, checkpoint, 2.0, decoder=decoder)
    assert_turns_match_reference(conv, settings, [(2.4, 2), (1.7, 3), (1.2, 4)])


def assert_turns_match_reference(conv, settings, turns: list[tuple[float, int]],
                                 reference_bundle=None) -> None:
    """Turns of (seconds, seed) synthetic voice, each reply judged against generate() on the
    whole conversation so far (on `reference_bundle` if given)."""
    mels, replies = [], []
    for seconds, seed in turns:
        audio = user_audio(seconds, seed)
        turn = judged_turn(conv, settings, audio, mels, replies,
                           reference_bundle=reference_bundle)
        assert_same_reply(conv, turn)
        mels.append(mel_of(audio))
        replies.append(list(turn.events[-1].token_ids))


def _im_end_gaps(ref: Reference, im_end: int) -> list[float]:
    """How far `<|im_end|>` is behind the best token at each step of generate()'s reply."""
    return [float(logits.max() - logits[im_end]) for logits in ref.thinker]


@pytest.mark.parametrize("decoder", ["eager", "fast"])
def test_text_ended_by_im_end_equals_generate(any_tiny, decoder):
    """A reply whose text ends with `<|im_end|>` (a change of the thinker's head makes it win at
    one step, for the engine and generate() alike): the talker gets the end of text in place of
    `<|im_end|>` and pads after it, and the next turn builds on the text without it."""
    checkpoint, bundle = any_tiny
    first, second = user_audio(2.4, seed=2), user_audio(1.7, seed=3)
    conv, settings = make_conversation(bundle, checkpoint, 1.0, decoder=decoder)
    unbiased = judged_turn(conv, settings, first, [], [])
    im_end = conv.tokens.im_end
    step, direction, scale, least = steering(unbiased.ref.states["thinker"][:MAX_TOKENS - 1],
                                             _im_end_gaps(unbiased.ref, im_end))
    assert least > 1e-3  # no near tie decides where the text ends

    conv, settings = make_conversation(bundle, checkpoint, 1.0, decoder=decoder)
    with steered(bundle.model.thinker.lm_head, im_end, direction, scale):
        turn = judged_turn(conv, settings, first, [], [])
        assert turn.ref.reply.reply_ids[-1] == im_end and len(turn.ids) == step + 1
        assert turn.events[-1].reason == "eos"
        assert_same_reply(conv, turn)
        kept = list(turn.events[-1].token_ids)
        assert kept == turn.ids[:-1]
        assert_same_reply(conv, judged_turn(conv, settings, second, [mel_of(first)], [kept]))


def test_text_outlasting_the_speech_is_cut_where_the_frames_end(any_tiny):
    """More text than frames (max_reply_seconds ends the reply): one token per frame, no token
    sampled past the last frame, generate()'s tokens and codes for as far as the engine got,
    and the history keeps just that text."""
    checkpoint, bundle = any_tiny
    conv, settings = make_conversation(bundle, checkpoint, 1.0, max_tokens=MAX_FRAMES + 10)
    turn = judged_turn(conv, settings, user_audio(2.4, seed=2), [], [])
    assert len(turn.ref.reply.reply_ids) > MAX_FRAMES and len(turn.ids) == MAX_FRAMES
    assert_same_reply(conv, turn, text_prefix=True)
    assert list(turn.events[-1].token_ids) == turn.ids and conv.turns[-1].reply_ids == turn.ids


def _codec_eos_gaps(conv, ref: Reference) -> list[float]:
    """How far the codec end is behind the best code 0 at each of generate()'s frames (scores
    as the talker's sampler sees them, with the repetition penalty of the frames before)."""
    sampler = conv.talker_sampler
    seen = torch.zeros_like(ref.talker[0], dtype=torch.bool)
    gaps = []
    for f, logits in enumerate(ref.talker[:ref.frames]):
        scores = sampler._penalized(logits, seen)
        gaps.append(float(scores.max() - scores[conv.codec_eos]))
        seen[int(ref.reply.codes[0, f])] = True
    return gaps


@pytest.mark.parametrize("decoder", ["eager", "fast"])
def test_speech_ending_before_the_text_equals_generate(any_tiny, decoder):
    """The talker ends the reply (a change of its head makes the codec end win at one frame)
    while the thinker still has text: generate()'s codes, its text as far as the engine read it
    (the token launched with the frame after the last is dropped), and the next turn is
    generate()'s on that text."""
    checkpoint, bundle = any_tiny
    first, second = user_audio(2.4, seed=2), user_audio(1.7, seed=3)
    conv, settings = make_conversation(bundle, checkpoint, 1.0, decoder=decoder,
                                       max_tokens=MAX_FRAMES + 4)
    unbiased = judged_turn(conv, settings, first, [], [])
    frame, direction, scale, least = steering(unbiased.ref.states["talker"][:MAX_FRAMES - 1],
                                              _codec_eos_gaps(conv, unbiased.ref), earliest=3)
    assert least > 1e-3

    conv, settings = make_conversation(bundle, checkpoint, 1.0, decoder=decoder,
                                       max_tokens=MAX_FRAMES + 4)
    with steered(bundle.model.talker.codec_head, conv.codec_eos, direction, scale):
        turn = judged_turn(conv, settings, first, [], [])
        assert turn.ref.frames == frame and len(turn.ids) == frame + 1
        assert_same_reply(conv, turn, text_prefix=True)
        kept = list(turn.events[-1].token_ids)
        assert kept == turn.ids
    assert_same_reply(conv, judged_turn(conv, settings, second, [mel_of(first)], [kept]),
                      text_prefix=True)  # 18 tokens allowed, 14 frames: text cut again


@pytest.mark.parametrize("packet_frames", [1, 2, 4])
def test_packet_sizes_tile_the_waveform(tiny_bundle, tiny_checkpoint, packet_frames):
    conv, _ = make_conversation(tiny_bundle, tiny_checkpoint, 1.0, packet_frames, first=1)
    ids, wave, events = run_turn(conv, user_audio(1.5, seed=4), chunk=8000)
    packets = [e for e in events if isinstance(e, AudioPacket)]
    assert packets[0].frames == 1
    assert all(p.frames in (packet_frames, 0) for p in packets[1:-1])
    with torch.inference_mode():
        expected = tiny_bundle.model.code2wav(conv.last_codes[None])[0, 0].numpy()
    assert wave.shape == expected.shape
    assert np.abs(wave - expected).max() < 1e-4


def test_cancel_then_continue_equals_generate_on_truncated_history(any_tiny):
    """Cancelled after two packets (three frames played), when a bit of the second frame had
    been heard: the history keeps the text the talker had been given in the two frames heard,
    not the tokens read for the frames after them, and the next reply is generate()'s on that
    history."""
    checkpoint, bundle = any_tiny
    conv, settings = make_conversation(bundle, checkpoint, 1.0, packet_frames=2)
    first, second = user_audio(2.2, seed=5), user_audio(1.4, seed=6)
    heard = 1920 + 100
    _, wave, events = run_turn(conv, first, chunk=3000, cancel_after_packets=2, heard=heard)
    assert heard <= len(wave)
    interrupted = events[-1]
    assert isinstance(interrupted, Interrupted)
    assert interrupted.heard_samples == heard
    cut = [i for i, e in enumerate(events) if isinstance(e, AudioPacket)][1]  # cancelled here
    assert not any(isinstance(e, (TextDelta, AudioPacket)) for e in events[cut + 1:-1])
    said = [t for e in events if isinstance(e, TextDelta) for t in e.token_ids]
    kept = conv.turns[-1].reply_ids
    assert len(said) > 2 and kept == said[:2]
    conv.cancel(0)  # between turns: harmless
    conv.cancel(0)
    assert_same_reply(conv, judged_turn(conv, settings, second, [mel_of(first)], [kept],
                                        chunk=3000))


def test_truncate_after_the_reply_finished_equals_generate_on_the_cut_history(any_tiny):
    """The engine is faster than real time, so a barge-in usually comes after the reply has
    finished generating: `truncate` then cuts the history to the frames heard, by the rule of
    `cancel`, and the next reply is generate()'s on that history. A reply heard whole stays;
    once the next turn has started, the last reply can no longer be cut."""
    checkpoint, bundle = any_tiny
    conv, settings = make_conversation(bundle, checkpoint, 1.0)
    first, second = user_audio(2.2, seed=5), user_audio(1.4, seed=6)
    _, wave, events = run_turn(conv, first, chunk=3000)
    finished = events[-1]
    assert isinstance(finished, TurnFinished)
    assert conv.truncate(len(wave)) == finished.text
    assert conv.turns[-1].reply_ids == list(finished.token_ids)
    text = conv.truncate(3 * 1920 + 100)  # a bit into the fourth frame
    kept = conv.turns[-1].reply_ids
    assert kept == list(finished.token_ids[:4])
    assert text == bundle.tokenizer.decode(kept, skip_special_tokens=True)
    assert_same_reply(conv, judged_turn(conv, settings, second, [mel_of(first)], [kept],
                                        chunk=3000))
    conv.feed(first[:1600])
    with pytest.raises(RuntimeError, match="next user turn"):
        conv.truncate(0)


def test_stock_conversation_truncates_by_the_same_rule(tiny_bundle, tiny_checkpoint):
    from duplex_chat.model.reference import StockConversation

    _, settings = make_conversation(tiny_bundle, tiny_checkpoint, 2.0)
    stock = StockConversation(tiny_bundle, settings.qwen)
    _, _, events = run_turn(stock, user_audio(1.5, seed=4), chunk=4000)
    full = list(events[-1].token_ids)
    assert stock.truncate(2 * 1920) == tiny_bundle.tokenizer.decode(full[:2],
                                                                     skip_special_tokens=True)
    assert stock._replies[-1] == full[:2]


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
    for chunk in (1, 317, 5 * 16_000):
        conv, _ = make_conversation(tiny_bundle, tiny_checkpoint, 1.0)
        ids, wave, _ = run_turn(conv, audio, chunk)
        results.append((ids, conv.last_codes, wave))
    for ids, codes, wave in results[1:]:
        assert ids == results[0][0]
        assert torch.equal(codes, results[0][1])
        assert np.array_equal(wave, results[0][2])


def test_long_conversation_drops_oldest_turns_and_stays_exact(any_tiny):
    """When the next turn would not fit, the oldest turns go, the rest is prefilled again, and
    the reply still equals generate() on the history that was kept."""
    checkpoint, bundle = any_tiny
    conv, settings = make_conversation(bundle, checkpoint, 1.0)
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
    conv.feed(audios[-1][:4000])  # the turn opens: the history is trimmed now
    kept = len(conv.turns)  # earlier turns still in the history
    turn = judged_turn(conv, settings, audios[-1], [mel_of(a) for a in audios[:-1][-kept:]],
                       replies[len(replies) - kept:], already_fed=4000)
    trimmed += [e for e in turn.events if isinstance(e, HistoryTrimmed)]
    assert trimmed and sum(e.dropped_turns for e in trimmed) >= 1
    assert len(conv.turns) - 1 < len(audios) - 1
    assert_same_reply(conv, turn)


def test_a_difference_passes_only_as_a_checked_tie(tiny_bundle, tiny_checkpoint):
    """The judge forces generate()'s choice where the step's inputs agree and generate()'s
    margin is a tie, and fails, naming the step, where either is not so. The engine's choice is
    made to differ by a stand-in sampler; its logits are generate()'s plus the head applied to a
    state difference."""
    conv, settings = make_conversation(tiny_bundle, tiny_checkpoint, 1.0)
    ref = judged_turn(conv, settings, user_audio(1.3, seed=9), [], []).ref
    head = tiny_bundle.model.talker.code_predictor.lm_head[0].weight  # codebook 1's (2048, d)
    logits = ref.predictor[0][2]  # frame 2, codebook 1: generate()'s choice is the argmax
    best, runner_up = logits.topk(2).indices.tolist()
    cases = {  # generate()'s margin there, how far apart the step's inputs are, a logits
        # difference no state explains -> passes?
        "tie": (TIE_MARGIN / 4, INPUTS_AGREE / 2, 0.0, True),
        "margin too wide": (10 * TIE_MARGIN, INPUTS_AGREE / 2, 0.0, False),
        "inputs apart": (TIE_MARGIN / 4, 10 * INPUTS_AGREE, 0.0, False),
        "logits apart otherwise": (TIE_MARGIN / 4, INPUTS_AGREE / 2, 10 * TIE_MARGIN, False),
    }
    step = 2 * 15  # frame 2, codebook 1 (15 predictor steps a frame)
    for name, (margin, apart, bias, passes) in cases.items():
        tweaked = logits.clone()
        tweaked[runner_up] = tweaked[best] - margin
        ref.predictor[0][2] = tweaked
        conv, _ = make_conversation(tiny_bundle, tiny_checkpoint, 1.0)
        conv.predictor_sampler = _Chooses(conv.predictor_sampler, runner_up)
        judge = Judge(conv, ref)
        state = torch.zeros(head.shape[1])
        state[3] = apart
        conv.predictor_sampler.calls = step
        try:
            engine_logits = tweaked + head.detach() @ state
            engine_logits[runner_up] += bias  # one logit moved: no state does that
            choice = conv.predictor_sampler(engine_logits)
            assert passes, name
            assert int(choice) == best and judge.forced[-1].step == step
        except AssertionError as failure:
            assert not passes and "frame 2, codebook 1" in str(failure), (name, failure)
        finally:
            judge.restore()
            ref.predictor[0][2] = logits


class _Chooses:
    """A sampler that picks `choice` whatever the logits: a stand-in for a wrong engine."""

    def __init__(self, sampler, choice: int):
        self.sampler, self.choice = sampler, choice

    def __getattr__(self, name):
        return getattr(self.sampler, name)

    def __call__(self, logits, **kwargs):
        return torch.tensor(self.choice)


# ---- voice and instructions per client, without rebuilding -------------------------------------
PIRATE = "You are a pirate. Answer in one short sentence."


def voiced_turn(conv, settings, audio, mels, replies, **kw):
    """`judged_turn`, and also the talker's first logits compared with generate()'s: greedy
    codes of the tiny talker rarely change with the speaker, its logits always do."""
    seen: list[torch.Tensor] = []
    head = conv.bundle.model.talker.codec_head
    hook = head.register_forward_hook(
        lambda _m, _i, out: seen.append(out.reshape(-1, out.shape[-1])[-1].detach().float()))
    try:
        turn = judged_turn(conv, settings, audio, mels, replies, **kw)
    finally:
        hook.remove()
    engine_first = seen[len(turn.ref.talker)]  # generate()'s calls came first
    assert torch.allclose(engine_first, turn.ref.talker[0].float(), atol=1e-5), \
        float((engine_first - turn.ref.talker[0]).abs().max())
    assert_same_reply(conv, turn)
    return turn


def test_reset_with_another_voice_and_prompt_equals_generate_with_them(any_tiny):
    """`reset(voice, system_prompt)`: the conversation built once (as Ethan, the default
    prompt) speaks the next client's reply exactly as generate() does with that speaker and
    system prompt; `reset()` with nothing keeps them."""
    checkpoint, bundle = any_tiny
    conv, settings = make_conversation(bundle, checkpoint, 1.0)
    run_turn(conv, user_audio(1.5, seed=7), chunk=4000)  # an earlier client's turn, forgotten
    conv.reset(voice="chelsie", system_prompt=PIRATE)
    assert conv.voice == "Chelsie" and conv.system_prompt == PIRATE
    other = settings.replace("qwen", voice="Chelsie", system_prompt=PIRATE)
    first, second = user_audio(2.2, seed=5), user_audio(1.4, seed=6)
    turn = voiced_turn(conv, other, first, [], [])
    voiced_turn(conv, other, second, [mel_of(first)], [list(turn.events[-1].token_ids)])
    conv.reset()
    assert (conv.voice, conv.system_prompt) == ("Chelsie", PIRATE)
    voiced_turn(conv, other, first, [], [])


@pytest.mark.parametrize("decoder", ["eager", "fast"])
def test_configure_between_replies_equals_generate_under_the_new_voice_and_prompt(any_tiny,
                                                                                 decoder):
    """`configure` after a reply: the history stays (prefilled again under the new system
    prompt), the last reply can still be truncated, and the next reply is generate()'s on the
    cut history with the new speaker and system prompt."""
    checkpoint, bundle = any_tiny
    conv, settings = make_conversation(bundle, checkpoint, 1.0, decoder=decoder)
    first, second = user_audio(2.2, seed=5), user_audio(1.4, seed=6)
    turn = judged_turn(conv, settings, first, [], [])
    assert_same_reply(conv, turn)
    conv.configure(voice="Aiden", system_prompt=PIRATE)
    text = conv.truncate(3 * 1920 + 100)  # heard a bit into the fourth frame
    kept = list(turn.events[-1].token_ids[:4])
    assert conv.turns[-1].reply_ids == kept
    assert text == bundle.tokenizer.decode(kept, skip_special_tokens=True)
    other = settings.replace("qwen", voice="Aiden", system_prompt=PIRATE)
    voiced_turn(conv, other, second, [mel_of(first)], [kept])


def test_configure_while_the_user_speaks_applies_to_that_reply(any_tiny):
    """Configured with a user turn open (part of it fed): its reply already follows the new
    prompt and voice, the history and the audio so far prefilled again; a prompt set to ""
    means none, as in generate()."""
    checkpoint, bundle = any_tiny
    conv, settings = make_conversation(bundle, checkpoint, 1.0)
    first, second = user_audio(2.2, seed=5), user_audio(2.6, seed=6)
    turn = judged_turn(conv, settings, first, [], [])
    replies = [list(turn.events[-1].token_ids)]
    fed = 24_000  # 1.5 s: a finished encoder window and part of the next
    for start in range(0, fed, 4000):
        conv.feed(second[start:min(fed, start + 4000)])
    conv.configure(voice="Chelsie", system_prompt="")
    other = settings.replace("qwen", voice="Chelsie", system_prompt="")
    voiced_turn(conv, other, second, [mel_of(first)], replies, already_fed=fed)


def test_an_unknown_voice_is_one_clear_error_and_changes_nothing(tiny_bundle, tiny_checkpoint):
    from duplex_chat.config import DuplexError

    conv, _ = make_conversation(tiny_bundle, tiny_checkpoint, 1.0)
    assert conv.voices() == ("Aiden", "Chelsie", "Ethan")
    before = (conv.voice, conv.speaker_id, conv.system_prompt)
    with pytest.raises(DuplexError, match=r"^Unknown voice 'alloy'; this model speaks Aiden, "
                                          r"Chelsie, Ethan\.$"):
        conv.configure(voice="alloy", system_prompt=PIRATE)
    with pytest.raises(DuplexError, match="at most 4000"):
        conv.configure(voice="Aiden", system_prompt="x" * 4001)
    with pytest.raises(DuplexError, match="Unknown voice"):
        conv.reset(voice="alloy")
    assert (conv.voice, conv.speaker_id, conv.system_prompt) == before
    assert not conv._prompt_stale
