"""A tiny random Qwen3-Omni checkpoint: the real architecture and special-token ids, random weights.

The tests (and anyone without a GPU) build one with `build_tiny_checkpoint(dir)` and load it back
through the same `load_model` path as a real checkpoint. Sizes are chosen so that `generate()` with
a few tokens takes well under a second on two CPU cores; `../shared/notes/tiny-model.md` lists the
config traps this module steps around.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch

from .listener import thinker_audio_tower, thinker_text_model
from .reference_config import release_config_dict

# Real ids of the special tokens the chat format and the model use (from the released tokenizer).
SPECIAL_TOKENS = {
    "<|endoftext|>": 151643,
    "<|im_start|>": 151644,
    "<|im_end|>": 151645,
    "<|vision_start|>": 151652,
    "<|vision_end|>": 151653,
    "<|image_pad|>": 151655,
    "<|video_pad|>": 151656,
    "<|audio_start|>": 151669,
    "<|audio_end|>": 151670,
    "<tts_pad>": 151671,
    "<tts_text_bos>": 151672,
    "<tts_text_eod>": 151673,
    "<tts_text_bos_single>": 151674,
    "<|audio_pad|>": 151675,
}
FIRST_SPECIAL_ID = 151643
VOCAB_SIZE = 152064
# Role words are single tokens in Qwen's vocabulary and the model looks for these exact ids.
ROLE_WORDS = {"user": 872, "assistant": 77091, "system": 8948}

_CONSONANTS = "bdfghklmnprstvz"
_VOWELS = "aeiou"


# Two shapes, so that a bug tied to one layout (a head count, a GQA group, a top-k, which layer
# feeds the talker, a vocoder window) shows on the other. "small" is the default test model.
SHAPES = {
    "small": dict(
        hidden=64, layers=2, heads=4, kv_heads=2, head_dim=16, mrope=[4, 2, 2], experts=4, top_k=2,
        audio_d=64, audio_layers=2, audio_heads=4,
        talker_hidden=64, talker_layers=2, talker_heads=4, talker_kv=2, talker_head_dim=16,
        talker_mrope=[4, 2, 2], talker_experts=4, talker_top_k=2, accept_layer=1,
        predictor_layers=2, predictor_heads=4, predictor_kv=2,
        vocoder_hidden=64, vocoder_layers=2, vocoder_heads=4, vocoder_window=4,
    ),
    "wide": dict(
        hidden=96, layers=3, heads=6, kv_heads=1, head_dim=16, mrope=[4, 2, 2], experts=8, top_k=3,
        audio_d=48, audio_layers=3, audio_heads=2,
        talker_hidden=48, talker_layers=3, talker_heads=2, talker_kv=1, talker_head_dim=24,
        talker_mrope=[6, 3, 3], talker_experts=6, talker_top_k=3, accept_layer=1,
        predictor_layers=3, predictor_heads=3, predictor_kv=1,
        vocoder_hidden=48, vocoder_layers=3, vocoder_heads=2, vocoder_window=6,
    ),
}


def tiny_config_dict(encoder_window_s: float = 2.0, shape: str = "small") -> dict:
    """The release config with every size shrunk to `SHAPES[shape]`; ids, rates and codebook
    layout kept."""
    s = SHAPES[shape]
    cfg = copy.deepcopy(release_config_dict())
    hidden = s["hidden"]
    thinker = cfg["thinker_config"]
    thinker["text_config"].update(
        hidden_size=hidden, intermediate_size=2 * hidden, moe_intermediate_size=hidden // 2,
        num_hidden_layers=s["layers"], num_attention_heads=s["heads"],
        num_key_value_heads=s["kv_heads"], head_dim=s["head_dim"], num_experts=s["experts"],
        num_experts_per_tok=s["top_k"], max_position_embeddings=8192,
    )
    thinker["text_config"]["rope_parameters"]["mrope_section"] = s["mrope"]
    thinker["audio_config"].update(
        d_model=s["audio_d"], encoder_layers=s["audio_layers"],
        encoder_attention_heads=s["audio_heads"], encoder_ffn_dim=2 * s["audio_d"],
        downsample_hidden_size=32, output_dim=hidden, n_window_infer=int(encoder_window_s * 100),
    )
    thinker["vision_config"].update(
        depth=1, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=hidden,
        deepstack_visual_indexes=[0],
    )
    talker = cfg["talker_config"]
    t_hidden = s["talker_hidden"]
    talker.update(thinker_hidden_size=hidden, accept_hidden_layer=s["accept_layer"])
    talker["text_config"].update(
        hidden_size=t_hidden, intermediate_size=2 * t_hidden, moe_intermediate_size=t_hidden // 2,
        shared_expert_intermediate_size=t_hidden // 2, num_hidden_layers=s["talker_layers"],
        num_attention_heads=s["talker_heads"], num_key_value_heads=s["talker_kv"],
        head_dim=s["talker_head_dim"], num_local_experts=s["talker_experts"],
        num_experts_per_tok=s["talker_top_k"], max_position_embeddings=8192,
    )
    talker["text_config"]["rope_parameters"]["mrope_section"] = s["talker_mrope"]
    talker["code_predictor_config"].update(
        hidden_size=t_hidden, intermediate_size=2 * t_hidden,
        num_hidden_layers=s["predictor_layers"], num_attention_heads=s["predictor_heads"],
        num_key_value_heads=s["predictor_kv"], head_dim=16,
        layer_types=["full_attention"] * s["predictor_layers"],
    )
    cfg["code2wav_config"].update(
        hidden_size=s["vocoder_hidden"], decoder_dim=64, intermediate_size=2 * s["vocoder_hidden"],
        num_hidden_layers=s["vocoder_layers"], num_attention_heads=s["vocoder_heads"],
        num_key_value_heads=s["vocoder_heads"], codebook_dim=32,
        vector_quantization_hidden_dimension=32, sliding_window=s["vocoder_window"],
    )
    cfg["dtype"] = "float32"
    thinker["dtype"] = "float32"
    return cfg


def build_tiny_model(encoder_window_s: float = 2.0, seed: int = 0, shape: str = "small"):
    """A tiny `Qwen3OmniMoeForConditionalGeneration` in float32 with seeded random weights that
    behave like trained ones where it matters for tests (see `make_lifelike`)."""
    from transformers import Qwen3OmniMoeConfig, Qwen3OmniMoeForConditionalGeneration

    config = Qwen3OmniMoeConfig(**tiny_config_dict(encoder_window_s, shape))
    torch.manual_seed(seed)
    model = Qwen3OmniMoeForConditionalGeneration(config)
    init_talker_moe(model.talker)
    make_lifelike(model, seed)
    return model.eval()


def init_talker_moe(talker) -> None:
    """Draw the talker's MoE router and expert weights as transformers draws the thinker's.

    transformers' `_init_weights` (5.17) initialises the thinker's router and experts but not the
    talker's: its router stays at zeros, so every expert ties and which ones a token gets is up
    to each top-k's tie-breaking (the eager path's and the fast path's differ), and its experts
    keep whatever `torch.empty` memory held (tiny denormals, now and then NaN). Models built
    from a config (the tiny test model, `bench --random-weights`) need them drawn; checkpoints
    carry their own."""
    from .quant.modules import quant_weight

    std = getattr(talker.config, "initializer_range", 0.02)
    with torch.no_grad():
        for layer in talker.model.layers:
            mlp = layer.mlp
            if hasattr(mlp, "experts"):
                mlp.gate.weight.normal_(0.0, std)
                if quant_weight(mlp.experts, "gate_up_proj") is None:  # quantized: drawn already
                    mlp.experts.gate_up_proj.normal_(0.0, std)
                    mlp.experts.down_proj.normal_(0.0, std)


# How far `make_lifelike` moves a fresh model from transformers' initialisation.
BIAS_STD = 0.05  # every bias the architecture has (transformers starts them at 0)
NORM_STD = 0.1  # norm weights: 1 + N(0, NORM_STD); LayerNorm biases N(0, BIAS_STD)
VOCODER_RMS = 0.1  # reply level, -20 dBFS, set through the vocoder's last conv
VOCODER_LAYER_SCALE = 0.1  # code2wav transformer's residual scales (init 0.01) and ConvNeXt gammas (1e-6)


def make_lifelike(model, seed: int = 0) -> None:
    """Move a freshly initialised model's weights to where a trained model's are, so that bugs
    that only show on real weights show on random ones too.

    transformers starts every bias at 0 and every norm at 1, so code that drops a bias or pads
    where the model reads padding (the audio encoder's convolutions read theirs) cannot be told
    from right code; here they get random values. The audio encoder and the vocoder are drawn at
    PyTorch's default scale (1/sqrt(fan_in)) instead of N(0, 0.02): at 0.02 the encoder's output is
    its position embedding (two different sentences 0.6 % apart) and the vocoder is silent (peak
    2e-6). The vocoder's residual scales are raised so its sliding-window attention matters, and
    its last conv sets the level of a reply to `VOCODER_RMS`. Works on any device and dtype (the
    full-size random model of `bench --random-weights` gets it too); draws from its own
    generator, so the same seed gives the same model."""
    from torch import nn

    generator = torch.Generator().manual_seed(10_000 + seed)

    def draw(tensor: torch.Tensor, mean: float, std: float) -> None:
        tensor.copy_(mean + std * torch.randn(tensor.shape, generator=generator))

    tower, vocoder = thinker_audio_tower(model.thinker), model.code2wav
    with torch.no_grad():
        for part in (tower, vocoder):
            for module in part.modules():
                if isinstance(module, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.ConvTranspose1d)):
                    draw(module.weight, 0.0, _fan_in(module) ** -0.5)
        for name, param in model.named_parameters():
            if ".visual." in name:
                continue
            leaf = name.rsplit(".", 1)[-1]
            if leaf == "bias":
                draw(param, 0.0, BIAS_STD)
            elif leaf == "weight" and param.dim() == 1:  # RMSNorm and LayerNorm weights
                draw(param, 1.0, NORM_STD)
            elif leaf in ("alpha", "beta"):  # SnakeBeta's log-scale frequency and magnitude
                draw(param, 0.0, NORM_STD)
            elif leaf in ("scale", "gamma"):  # vocoder residual scales
                draw(param, VOCODER_LAYER_SCALE, VOCODER_LAYER_SCALE / 4)
        _set_vocoder_level(vocoder, generator)
        _set_projection_levels(model, generator)


def _set_projection_levels(model, generator: torch.Generator) -> None:
    """Redraw the talker's text and hidden projections so that what they add to the talker's
    input is as large as the codec embeddings it is added to (at N(0, 0.02) the projected text
    is nearly its bias: a constant, and a talker that ignores its text hides every bug in the
    text it is given). Inputs: thinker embeddings of random ids, and the thinker's states at
    `accept_hidden_layer` for them."""
    talker, thinker = model.talker, model.thinker
    lm = thinker_text_model(thinker)
    device = lm.embed_tokens.weight.device
    ids = torch.randint(0, 150_000, (1, 32), generator=generator).to(device)
    embeds = lm.embed_tokens(ids)
    layer = model.config.talker_config.accept_hidden_layer
    states = lm(inputs_embeds=embeds, output_hidden_states=True).hidden_states[layer]
    tables = [talker.model.get_input_embeddings(), *talker.code_predictor.model.get_input_embeddings()]
    codes = [torch.randint(0, t.num_embeddings, (32,), generator=generator).to(device)
             for t in tables]
    target = sum(t(c) for t, c in zip(tables, codes)).norm(dim=-1).mean()  # a frame's codec sum
    for mlp, inputs in ((talker.text_projection, embeds[0]), (talker.hidden_projection, states[0])):
        scale = inputs.pow(2).mean().sqrt()
        for linear, gain in ((mlp.linear_fc1, 1 / scale), (mlp.linear_fc2, 1.0)):
            linear.weight.copy_(torch.randn(linear.weight.shape, generator=generator)
                                * float(gain) / linear.in_features ** 0.5)
        level = mlp(inputs).norm(dim=-1).mean()  # the bias (N(0, BIAS_STD)) adds little
        mlp.linear_fc2.weight.mul_(target / level)


def _fan_in(module) -> float:
    """Inputs that add into one output: a transposed conv (in, out, k) with stride s adds k / s
    taps of each input channel."""
    from torch import nn

    if isinstance(module, nn.ConvTranspose1d):
        return module.weight.shape[0] * module.kernel_size[0] / module.stride[0]
    return module.weight[0].numel()


def _set_vocoder_level(vocoder, generator: torch.Generator) -> None:
    """Scale the vocoder's last conv until random codes come out at `VOCODER_RMS` (within 1 %:
    bf16 weights cannot be scaled finer than about 0.4 %). The waveform is clamped to [-1, 1]
    after that conv, so a scaling is exact once nothing is clamped: while much is, a step only
    brings the level down, and the next one finishes the job."""
    last = vocoder.decoder[-1].conv
    codes = torch.randint(0, vocoder.config.codebook_size, (1, vocoder.config.num_quantizers, 24),
                          generator=generator).to(last.weight.device)
    with torch.no_grad():
        for _ in range(10):
            rms = float(vocoder(codes)[0, 0].float().pow(2).mean().sqrt())
            if abs(rms / VOCODER_RMS - 1) < 1e-2:
                return
            last.weight.mul_(VOCODER_RMS / rms)
            last.bias.mul_(VOCODER_RMS / rms)
    raise AssertionError(f"the tiny vocoder's level did not settle ({rms:.3g})")


def build_tiny_tokenizer():
    """A byte-level BPE tokenizer whose special tokens and role words sit at Qwen's real ids.

    Every other id below the special range decodes to a made-up syllable, so random replies
    still print as readable (if meaningless) text.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    byte_chars = list(pre_tokenizers.ByteLevel.alphabet())
    byte_chars.sort(key=_gpt2_byte_order)
    vocab: dict[str, int] = {ch: i for i, ch in enumerate(byte_chars)}
    merges: list[tuple[str, str]] = []
    next_id = len(vocab)
    reserved = set(ROLE_WORDS.values())
    for word, word_id in ROLE_WORDS.items():
        prefix = word[0]
        for ch in word[1:]:
            merged = prefix + ch
            if merged not in vocab:
                if merged == word:
                    vocab[merged] = word_id
                else:
                    while next_id in reserved:
                        next_id += 1
                    vocab[merged] = next_id
                    next_id += 1
            merges.append((prefix, ch))
            prefix = merged
    used = set(vocab.values())
    for token_id in range(FIRST_SPECIAL_ID):
        if token_id not in used:
            vocab[_syllable(token_id)] = token_id
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok)
    names = dict(SPECIAL_TOKENS)
    for token_id in range(FIRST_SPECIAL_ID, VOCAB_SIZE):
        if token_id not in names.values():
            names[f"<|extra_{token_id}|>"] = token_id
    for name, token_id in sorted(names.items(), key=lambda kv: kv[1]):
        fast._tokenizer.add_special_tokens([name])
        assert fast.convert_tokens_to_ids(name) == token_id, (name, token_id)
    fast.eos_token = "<|im_end|>"
    fast.pad_token = "<|endoftext|>"
    return fast


def _gpt2_byte_order(ch: str) -> int:
    """Position of a byte-level character in GPT-2/Qwen order (so '\\n' is id 198)."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    code = ord(ch)
    if code in printable:
        return printable.index(code)
    return len(printable) + (code - 256)


def _syllable(token_id: int) -> str:
    """A deterministic pronounceable word for an id: 'Ġ' (space) + two or three syllables."""
    parts = []
    n = token_id
    for _ in range(3):
        n, c = divmod(n, len(_CONSONANTS))
        n, v = divmod(n, len(_VOWELS))
        parts.append(_CONSONANTS[c] + _VOWELS[v])
        if n == 0:
            break
    return "Ġ" + "".join(parts) + (f"{n}" if n else "")


def build_tiny_checkpoint(directory: str | Path, encoder_window_s: float = 2.0, seed: int = 0,
                          shape: str = "small") -> Path:
    """Write a complete tiny checkpoint (config, weights, tokenizer, feature extractor) to `directory`.

    The directory loads with `load_model` exactly like a downloaded Qwen3-Omni.
    """
    from transformers import WhisperFeatureExtractor

    from transformers.utils import logging as hf_logging

    from .loading import quiet_transformers

    quiet_transformers()  # the tiny config's rope keys draw a harmless warning
    hf_logging.disable_progress_bar()
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    model = build_tiny_model(encoder_window_s, seed, shape)
    model.save_pretrained(directory)
    build_tiny_tokenizer().save_pretrained(directory)
    WhisperFeatureExtractor(feature_size=128, sampling_rate=16000).save_pretrained(directory)
    (directory / "TINY_RANDOM_MODEL.txt").write_text(
        "Random weights for tests: this model does not understand or say anything meaningful.\n"
    )
    return directory


def is_tiny_checkpoint(directory: str | Path) -> bool:
    return (Path(directory) / "TINY_RANDOM_MODEL.txt").is_file()


def config_json(directory: str | Path) -> dict:
    return json.loads((Path(directory) / "config.json").read_text())
