"""StreamingVocoder against one-piece code2wav on the tiny random model (CPU, float32)."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from duplex_chat.model.tiny import build_tiny_model
from duplex_chat.model.vocoder import StreamingVocoder

CODEBOOK_SIZE = 2048
NUM_QUANTIZERS = 16
SAMPLES_PER_FRAME = 1920
ONE_PIECE_SHORTFALL = 555  # samples one-piece decoding returns less than n * 1920 (release layout)
TOLERANCE = 1e-4
SHORT_FRAMES = 37
# > 2 sliding windows of 72 frames, and beyond what frame 0 can reach through 2 layers of them
LONG_FRAMES = 200
# Weight scale for the re-drawn vocoder: output std ~0.5 with ~20% of samples clamped.
WEIGHT_GAIN = 0.7


def _wake_up(code2wav: torch.nn.Module, seed: int = 0) -> None:
    """Re-draw code2wav's weights so its waveform has speech-like amplitude.

    The tiny model's init (layer scales 0.01, ConvNeXt gamma 1e-6, SnakeBeta at 0) gives a
    waveform of ~2e-6, which any 1e-4 tolerance would accept; these weights give ~0.5 with
    clamping, and make the attention window matter for the output.
    """
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in code2wav.named_parameters():
            if param.dim() >= 2:
                fan_in = param[0].numel()
                param.copy_(torch.randn(param.shape, generator=gen) * WEIGHT_GAIN / math.sqrt(fan_in))
            elif name.endswith(("alpha", "beta")):
                param.copy_(torch.randn(param.shape, generator=gen) * 0.3)
            elif name.endswith("bias"):
                param.copy_(torch.randn(param.shape, generator=gen) * 0.1)
            else:
                param.fill_(1.0)


@pytest.fixture(scope="module")
def code2wav():
    module = build_tiny_model().code2wav
    _wake_up(module)
    return module


def _codes(n_frames: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, CODEBOOK_SIZE, (NUM_QUANTIZERS, n_frames), generator=gen)


def _one_piece(code2wav, codes: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return code2wav(codes[None])[0, 0].float()


def _stream(vocoder: StreamingVocoder, codes: torch.Tensor, sizes: list[int]) -> torch.Tensor:
    """Push codes in packets of the given sizes (cycled); check lengths after each push."""
    pieces, start = [], 0
    for size in itertools.cycle(sizes):
        if start >= codes.shape[1]:
            break
        pieces.append(vocoder.push(codes[:, start : start + size]))
        start = min(start + size, codes.shape[1])
        assert vocoder.frames_pushed == start
        assert vocoder.samples_emitted == vocoder.output_length(start)
    pieces.append(vocoder.flush())
    return torch.cat(pieces)


def test_waveform_is_loud_enough_to_test(code2wav):
    ref = _one_piece(code2wav, _codes(SHORT_FRAMES, seed=1))
    assert ref.std() > 0.2
    assert (ref.abs() == 1.0).any()  # the clamp is exercised


@pytest.mark.parametrize("sizes", [[1], [2], [4], [1, 2, 4, 3], [5, 1, 1, 7]])
def test_packets_concatenate_to_one_piece(code2wav, sizes):
    codes = _codes(SHORT_FRAMES, seed=1)
    ref = _one_piece(code2wav, codes)
    vocoder = StreamingVocoder(code2wav)
    out = _stream(vocoder, codes, sizes)
    assert out.dtype == torch.float32
    assert out.shape == ref.shape
    assert out.shape[0] == SAMPLES_PER_FRAME * SHORT_FRAMES - ONE_PIECE_SHORTFALL
    assert (out - ref).abs().max().item() < TOLERANCE


def test_first_and_later_packet_lengths(code2wav):
    vocoder = StreamingVocoder(code2wav)
    assert vocoder.samples_per_frame == SAMPLES_PER_FRAME
    codes = _codes(7, seed=2)
    assert vocoder.push(codes[:, :1]).shape[0] == SAMPLES_PER_FRAME - ONE_PIECE_SHORTFALL
    assert vocoder.push(codes[:, 1:3]).shape[0] == 2 * SAMPLES_PER_FRAME
    assert vocoder.push(codes[:, 3:3]).shape[0] == 0
    assert vocoder.push(codes[:, 3:]).shape[0] == 4 * SAMPLES_PER_FRAME
    assert vocoder.flush().shape == (0,)
    assert vocoder.frames_pushed == 0  # flush resets


def test_long_sequence_beyond_window(code2wav):
    codes = _codes(LONG_FRAMES, seed=3)
    ref = _one_piece(code2wav, codes)
    out = _stream(StreamingVocoder(code2wav), codes, [5, 8, 3])
    assert out.shape == ref.shape
    assert (out - ref).abs().max().item() < TOLERANCE
    # The window really limits context here (2 layers reach 2 * 71 frames back, the convs a few
    # more), so a cache that kept too much or too little would fail above: frame 0 changes the
    # start but not the last frames' audio.
    changed = codes.clone()
    changed[:, 0] = (changed[:, 0] + 1) % CODEBOOK_SIZE
    ref_changed = _one_piece(code2wav, changed)
    tail = 20 * SAMPLES_PER_FRAME
    assert torch.equal(ref_changed[-tail:], ref[-tail:])
    assert not torch.equal(ref_changed[:tail], ref[:tail])


def test_reset_then_reuse_is_identical(code2wav):
    codes = _codes(SHORT_FRAMES, seed=4)
    vocoder = StreamingVocoder(code2wav)
    first = _stream(vocoder, codes, [3])
    vocoder.push(_codes(5, seed=5))  # leave state behind, then drop it
    vocoder.reset()
    second = _stream(vocoder, codes, [3])
    assert torch.equal(first, second)


def test_inference_mode_and_mixed_modes(code2wav):
    codes = _codes(12, seed=6)
    ref = _one_piece(code2wav, codes)
    vocoder = StreamingVocoder(code2wav)
    with torch.inference_mode():
        head = vocoder.push(codes[:, :5])
    tail = vocoder.push(codes[:, 5:])  # state made in inference mode, used outside it
    out = torch.cat([head, tail])
    assert (out - ref).abs().max().item() < TOLERANCE


def test_bad_codes_are_refused(code2wav):
    vocoder = StreamingVocoder(code2wav)
    with pytest.raises(ValueError):
        vocoder.push(torch.zeros(8, 3, dtype=torch.long))
    with pytest.raises(TypeError):
        vocoder.push(torch.zeros(NUM_QUANTIZERS, 3))


def test_cuda_graphs_need_cuda(code2wav):
    with pytest.raises(ValueError):
        StreamingVocoder(code2wav, cuda_graphs=True)
