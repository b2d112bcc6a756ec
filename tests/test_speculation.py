"""A speculative start taken back: the engine's `checkpoint` / `rollback`.

A speculation ends the turn early (at a pause) and runs the reply up to its first audio packet;
when the user goes on speaking it is rolled back and the turn continues. A conversation with
rolled-back speculations must equal one that never speculated, token for token and code for
code: against generate() (greedy, both tiny shapes, the eager and the fast decoder), and, with
sampling on, against the same conversation run without speculating (the samplers' random state
is part of what is rolled back).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from duplex_chat.model.engine import StreamingConversation
from duplex_chat.model.events import AudioPacket, TextDelta, TurnStarted
from duplex_chat.model.speculation import Speculation

from .conftest import tiny_settings
from .fidelity import (
    Compared,
    assert_same_reply,
    judged_turn,
    mel_of,
    reference,
    run_turn,
    user_audio,
)
from .test_engine_fidelity import make_conversation

CHUNK = 4000  # 250 ms pieces, as the fidelity tests feed


def feed(conv, audio: np.ndarray, chunk: int = CHUNK) -> None:
    for start in range(0, len(audio), chunk):
        conv.feed(audio[start:start + chunk])


def speculate_and_roll_back(conv) -> list:
    """End the turn speculatively, run the reply to its first audio packet, take it all back.
    Returns the events the speculation produced."""
    speculation = Speculation(conv)
    speculation.take_back()
    return speculation.held


@pytest.mark.parametrize("decoder", ["eager", "fast"])
def test_rolled_back_speculations_leave_generate_s_replies(any_tiny, decoder):
    """Speculations in the middle of an encoder window, on a window's edge and twice in one
    turn, over three turns: every reply is generate()'s on the whole turns."""
    checkpoint, bundle = any_tiny
    conv, settings = make_conversation(bundle, checkpoint, 1.0, decoder=decoder)
    # (seconds, seed, where to speculate in samples): 1.0 s windows are 16000 samples
    turns = [(2.4, 2, [12000]), (1.7, 3, [16000]), (2.2, 4, [4000, 20000])]
    mels, replies = [], []
    for seconds, seed, stops in turns:
        audio = user_audio(seconds, seed)
        fed = 0
        for stop in stops:
            feed(conv, audio[fed:stop])
            fed = stop
            events = speculate_and_roll_back(conv)
            assert any(isinstance(e, TurnStarted) for e in events)
            assert isinstance(events[-1], AudioPacket)  # it got as far as the first packet
        turn = judged_turn(conv, settings, audio, mels, replies, already_fed=fed)
        assert_same_reply(conv, turn)
        mels.append(mel_of(audio))
        replies.append(list(turn.events[-1].token_ids))


def test_a_speculation_before_any_audio_is_taken_back_too(tiny_bundle, tiny_checkpoint):
    """The first turn opened by the speculation itself (nothing fed yet): still exact."""
    conv, settings = make_conversation(tiny_bundle, tiny_checkpoint, 1.0)
    speculate_and_roll_back(conv)
    audio = user_audio(1.5, 7)
    turn = judged_turn(conv, settings, audio, [], [])
    assert_same_reply(conv, turn)


def test_a_speculation_used_plays_the_reply_generate_would(tiny_bundle, tiny_checkpoint):
    """Taken back once, then held at the turn's real end and played from there: the reply is
    generate()'s, its first packet among the held events."""
    conv, settings = make_conversation(tiny_bundle, tiny_checkpoint, 1.0)
    audio = user_audio(2.2, 9)
    feed(conv, audio[:20000])
    speculate_and_roll_back(conv)
    feed(conv, audio[20000:])
    speculation = Speculation(conv)
    assert isinstance(speculation.held[-1], AudioPacket)
    # Judged as a whole (the held steps were sampled before a Judge could stand in):
    ref = reference(conv.bundle, settings, [mel_of(audio)], [], conv.max_frames)
    ids, wave, events = run_turn(conv, audio[:0], CHUNK, events=speculation.events())
    assert_same_reply(conv, Compared(ids, wave, events, ref, []))
    with pytest.raises(RuntimeError, match="once"):
        speculation.take_back()


def _sampled_turns(bundle, checkpoint, speculate: bool, decoder: str, **qwen) -> list:
    settings = tiny_settings(checkpoint, greedy=False, encoder_window_s=1.0, decoder=decoder,
                             max_reply_tokens=10, max_reply_seconds=14 / 12.5, **qwen)
    conv = StreamingConversation(bundle, settings, seed=5)
    results = []
    for seconds, seed in [(2.1, 11), (1.6, 12)]:
        audio = user_audio(seconds, seed)
        half = len(audio) // 2
        feed(conv, audio[:half])
        if speculate:
            speculate_and_roll_back(conv)
            speculate_and_roll_back(conv)  # twice: the second starts from the restored state
        feed(conv, audio[half:])
        ids, packets = [], []
        for event in conv.end_turn():
            if isinstance(event, TextDelta):
                ids.extend(event.token_ids)
            elif isinstance(event, AudioPacket):
                packets.append(event.samples)
        results.append((ids, conv.last_codes.cpu().clone(), np.concatenate(packets)))
    return results


@pytest.mark.parametrize("decoder", ["eager", "fast"])
def test_with_sampling_a_rolled_back_speculation_changes_nothing(tiny_bundle, tiny_checkpoint,
                                                                 decoder):
    """Sampling draws from the generator: the speculation's draws are taken back with it, so
    the same seed gives the same replies, bit for bit, with and without speculating."""
    plain = _sampled_turns(tiny_bundle, tiny_checkpoint, speculate=False, decoder=decoder)
    speculated = _sampled_turns(tiny_bundle, tiny_checkpoint, speculate=True, decoder=decoder)
    for (ids, codes, wave), (ids2, codes2, wave2) in zip(plain, speculated):
        assert ids == ids2
        assert torch.equal(codes, codes2)
        assert np.array_equal(wave, wave2)


@pytest.mark.gpu
def test_on_the_gpu_the_graphs_random_draws_are_taken_back_too(tiny_checkpoint):
    """Inside CUDA graphs the samplers draw from the device's default generator: a sampled
    conversation with rolled-back speculations equals one without, bit for bit."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    from duplex_chat.model.loading import load_model

    bundle = load_model(tiny_settings(tiny_checkpoint, device_map="cuda").qwen)
    plain = _sampled_turns(bundle, tiny_checkpoint, False, "fast", device_map="cuda")
    # First the GPU against itself: a run that differs without any speculation would make the
    # comparison below blame the rollback for the GPU's own nondeterminism.
    again = _sampled_turns(bundle, tiny_checkpoint, False, "fast", device_map="cuda")
    for (ids, codes, wave), (ids2, codes2, wave2) in zip(plain, again):
        assert ids == ids2 and torch.equal(codes, codes2) and np.array_equal(wave, wave2), (
            "the same sampled conversation run twice differs on this GPU")
    speculated = _sampled_turns(bundle, tiny_checkpoint, True, "fast", device_map="cuda")
    for (ids, codes, wave), (ids2, codes2, wave2) in zip(plain, speculated):
        assert ids == ids2
        assert torch.equal(codes, codes2)
        assert np.array_equal(wave, wave2)


def test_without_restoring_the_random_state_the_sampled_replies_differ(tiny_bundle,
                                                                     tiny_checkpoint,
                                                                     monkeypatch):
    """The test above can fail: a rollback that leaves the generators where the speculation
    took them changes the sampled replies."""
    from duplex_chat.model import engine

    plain = _sampled_turns(tiny_bundle, tiny_checkpoint, speculate=False, decoder="eager")
    monkeypatch.setattr(engine, "_set_rng_states", lambda generator, states: None)
    speculated = _sampled_turns(tiny_bundle, tiny_checkpoint, speculate=True, decoder="eager")
    assert [ids for ids, _, _ in plain] != [ids for ids, _, _ in speculated]
