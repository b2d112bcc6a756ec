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


def tiny_config_dict(encoder_window_s: float = 2.0, seed_layers: int = 2) -> dict:
    """The release config with every size shrunk; ids, rates and codebook layout kept."""
    cfg = copy.deepcopy(release_config_dict())
    hidden, layers = 64, seed_layers
    thinker = cfg["thinker_config"]
    thinker["text_config"].update(
        hidden_size=hidden, intermediate_size=128, moe_intermediate_size=32,
        num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
        num_experts=4, num_experts_per_tok=2, max_position_embeddings=8192,
    )
    thinker["text_config"]["rope_parameters"]["mrope_section"] = [4, 2, 2]
    thinker["audio_config"].update(
        d_model=64, encoder_layers=2, encoder_attention_heads=4, encoder_ffn_dim=128,
        downsample_hidden_size=32, output_dim=hidden, n_window_infer=int(encoder_window_s * 100),
    )
    thinker["vision_config"].update(
        depth=1, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=hidden,
        deepstack_visual_indexes=[0],
    )
    talker = cfg["talker_config"]
    talker.update(thinker_hidden_size=hidden, accept_hidden_layer=layers - 1)
    talker["text_config"].update(
        hidden_size=hidden, intermediate_size=128, moe_intermediate_size=32,
        shared_expert_intermediate_size=32, num_hidden_layers=layers, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, num_local_experts=4, num_experts_per_tok=2,
        max_position_embeddings=8192,
    )
    talker["text_config"]["rope_parameters"]["mrope_section"] = [4, 2, 2]
    talker["code_predictor_config"].update(
        hidden_size=hidden, intermediate_size=128, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16,
        layer_types=["full_attention"] * layers,
    )
    cfg["code2wav_config"].update(
        hidden_size=hidden, decoder_dim=64, intermediate_size=128, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=4, codebook_dim=32,
        vector_quantization_hidden_dimension=32,
    )
    cfg["dtype"] = "float32"
    thinker["dtype"] = "float32"
    return cfg


def build_tiny_model(encoder_window_s: float = 2.0, seed: int = 0):
    """A tiny `Qwen3OmniMoeForConditionalGeneration` in float32 with seeded random weights."""
    from transformers import Qwen3OmniMoeConfig, Qwen3OmniMoeForConditionalGeneration

    config = Qwen3OmniMoeConfig(**tiny_config_dict(encoder_window_s))
    torch.manual_seed(seed)
    model = Qwen3OmniMoeForConditionalGeneration(config)
    init_talker_moe(model.talker)
    return model.eval()


def init_talker_moe(talker) -> None:
    """Draw the talker's MoE router and expert weights as transformers draws the thinker's.

    transformers' `_init_weights` (5.17) initialises the thinker's router and experts but not the
    talker's: its router stays at zeros, so every expert ties and which ones a token gets is up
    to each top-k's tie-breaking (the eager path's and the fast path's differ), and its experts
    keep whatever `torch.empty` memory held (tiny denormals, now and then NaN). Models built
    from a config (the tiny test model, `bench --random-weights`) need them drawn; checkpoints
    carry their own."""
    std = getattr(talker.config, "initializer_range", 0.02)
    with torch.no_grad():
        for layer in talker.model.layers:
            mlp = layer.mlp
            if hasattr(mlp, "experts"):
                for weight in (mlp.gate.weight, mlp.experts.gate_up_proj, mlp.experts.down_proj):
                    weight.normal_(0.0, std)


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


def build_tiny_checkpoint(directory: str | Path, encoder_window_s: float = 2.0, seed: int = 0) -> Path:
    """Write a complete tiny checkpoint (config, weights, tokenizer, feature extractor) to `directory`.

    The directory loads with `load_model` exactly like a downloaded Qwen3-Omni.
    """
    from transformers import WhisperFeatureExtractor

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    model = build_tiny_model(encoder_window_s, seed)
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
