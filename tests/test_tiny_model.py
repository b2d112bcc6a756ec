"""The tiny test models are not degenerate, and the listener encodes a turn as generate() does.

A random model straight from transformers' initialisation hides bugs: zero biases, unit norms,
an audio encoder that answers every sentence alike and a silent vocoder make wrong code look
right. `model/tiny.py` moves the weights to where they matter; these tests hold it there, for
both shapes the fidelity suite runs on.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from duplex_chat.audio.features import StreamingMel
from duplex_chat.model.listener import Listener, thinker_audio_tower
from duplex_chat.model.prompt import MEL_FRAMES_PER_CHUNK
from duplex_chat.model.reference import encoder_window
from duplex_chat.model.tiny import SHAPES, VOCODER_RMS, tiny_config_dict

from .audio_helpers import espeak_speech



def test_the_two_shapes_differ_where_layouts_break_code():
    small, wide = (tiny_config_dict(shape=s) for s in ("small", "wide"))
    for part, keys in {
        ("thinker_config", "text_config"): ("num_attention_heads", "num_key_value_heads",
                                            "num_experts", "num_experts_per_tok",
                                            "num_hidden_layers", "hidden_size"),
        ("talker_config", "text_config"): ("num_attention_heads", "num_key_value_heads",
                                           "num_local_experts", "num_experts_per_tok",
                                           "num_hidden_layers", "head_dim"),
        ("code2wav_config",): ("sliding_window", "num_hidden_layers", "num_attention_heads"),
    }.items():
        a, b = small, wide
        for key in part:
            a, b = a[key], b[key]
        assert all(a[k] != b[k] for k in keys), part
    assert set(SHAPES) == {"small", "wide"}


def test_weights_look_trained(any_tiny):
    """Every bias is non-zero and every norm off 1, except in the unused vision tower; the
    talker's MoE routes (its router is drawn)."""
    _, bundle = any_tiny
    # The vocoder's last bias is the waveform's DC offset: scaled down with its level.
    dc_offset = f"code2wav.decoder.{len(bundle.model.code2wav.decoder) - 1}.conv.bias"
    for name, param in bundle.model.named_parameters():
        if ".visual." in name or name == dc_offset:
            continue
        if name.endswith("bias"):
            assert param.abs().mean() > 1e-2, name
        elif param.dim() == 1 and name.endswith("weight"):
            assert (param - 1).abs().mean() > 1e-2, name
    for layer in bundle.model.talker.model.layers:
        assert layer.mlp.gate.weight.std() > 1e-3


def test_the_audio_encoder_hears_what_is_said(any_tiny):
    """Two sentences give clearly different audio embeddings, not the position embedding."""
    _, bundle = any_tiny
    tower = thinker_audio_tower(bundle.model.thinker)
    embeds = []
    for text in ("Hello, how are you today?", "Seven green frogs jumped over the fence."):
        mel = StreamingMel()
        audio = espeak_speech(text)
        frames = torch.cat([mel.feed(audio), mel.finish()], dim=1)[:, :150]
        with torch.inference_mode():
            out = tower(input_features=frames, feature_lens=torch.tensor([frames.shape[1]]))
        embeds.append(out.last_hidden_state)
    a, b = embeds
    assert ((a - b).norm(dim=-1) / a.norm(dim=-1)).mean() > 0.1


def test_the_vocoder_speaks_at_a_level_people_hear(any_tiny):
    """Random codes come out at about -20 dBFS, and its attention window is shorter than the
    fidelity tests' replies (14 frames), so it slides within one."""
    _, bundle = any_tiny
    vocoder = bundle.model.code2wav
    codes = torch.randint(0, 2048, (1, 16, 30), generator=torch.Generator().manual_seed(5))
    with torch.inference_mode():
        wave = vocoder(codes)[0, 0]
    rms = float(wave.pow(2).mean().sqrt())
    assert VOCODER_RMS / 2 < rms < VOCODER_RMS * 2
    assert float(wave.abs().max()) < 1.0  # not clipped
    assert vocoder.config.sliding_window < 14


@pytest.mark.parametrize("seconds,window_s", [(0.41, 1.0), (1.37, 1.0), (2.71, 2.0), (3.0, 1.0)])
def test_the_listener_encodes_a_turn_as_generate_does(any_tiny, seconds, window_s):
    """Window by window while listening, then the tail: the same embeddings as the encoder
    gives for the whole turn in generate()'s batch (beside a longer turn, so that its last,
    partial chunk is padded to 100 frames and its convolutions read that padding)."""
    _, bundle = any_tiny
    thinker = bundle.model.thinker
    audio = espeak_speech("Please tell me what the weather will be like tomorrow.")
    audio = np.resize(audio, int(seconds * 16_000))
    listener = Listener(thinker, window_s)
    pieces = [listener.feed(audio[i:i + 3000]) for i in range(0, len(audio), 3000)]
    pieces.append(listener.finish())
    streamed = torch.cat([p for p in pieces if p is not None])

    mel = StreamingMel()
    turn = torch.cat([mel.feed(audio), mel.finish()], dim=1)
    longer = torch.randn(turn.shape[0], 2 * MEL_FRAMES_PER_CHUNK + 30,
                         generator=torch.Generator().manual_seed(1))
    tower = thinker_audio_tower(thinker)
    with torch.inference_mode(), encoder_window(bundle.model, window_s):
        whole = tower(input_features=torch.cat([turn, longer], dim=1),
                      feature_lens=torch.tensor([turn.shape[1], longer.shape[1]]))
    expected = whole.last_hidden_state[:streamed.shape[0]]
    assert streamed.shape == expected.shape
    # float32, the same operations on the same numbers in another batch: rounding only, at most
    # 1.0e-6 on these cases (2026-12-05); encoding the tail unpadded was 2.6e-3 to 4.2e-3 off.
    assert (streamed - expected).abs().max() < 1e-5


def test_lifelike_weights_settle_in_bfloat16():
    """`bench --random-weights` draws the full-size model in bf16: the vocoder's level must
    settle there too (bf16 cannot scale finer than ~0.4 %; seeds 2, 4 and 5 once failed)."""
    from transformers import Qwen3OmniMoeConfig, Qwen3OmniMoeForConditionalGeneration

    from duplex_chat.model.tiny import init_talker_moe, make_lifelike

    model = Qwen3OmniMoeForConditionalGeneration(Qwen3OmniMoeConfig(**tiny_config_dict()))
    model = model.to(torch.bfloat16).eval()
    init_talker_moe(model.talker)
    codes = torch.randint(0, 2048, (1, 16, 24), generator=torch.Generator().manual_seed(3))
    for seed in (2, 4, 5):
        make_lifelike(model, seed)
        with torch.inference_mode():
            rms = float(model.code2wav(codes)[0, 0].float().pow(2).mean().sqrt())
        assert VOCODER_RMS / 2 < rms < VOCODER_RMS * 2
