"""The chat format Qwen3-Omni was trained on, as token ids, for voice turns.

    <|im_start|>system\\n{prompt}<|im_end|>\\n
    <|im_start|>user\\n<|audio_start|><|audio_pad|>×N<|audio_end|><|im_end|>\\n
    <|im_start|>assistant\\n{reply}<|im_end|>\\n

N, the number of audio tokens for T mel frames, comes from the encoder's own length formula.
"""

from __future__ import annotations

from dataclasses import dataclass

MEL_FRAMES_PER_CHUNK = 100  # the encoder convolves each 1 s of mel (100 frames) on its own
TOKENS_PER_FULL_CHUNK = 13  # ...and turns it into 13 audio tokens


@dataclass(frozen=True)
class ChatTokens:
    """Ids of the chat format's tokens, read from the model config and tokenizer."""

    im_start: int
    im_end: int
    newline: int
    system: int
    user: int
    assistant: int
    audio_start: int
    audio_end: int
    audio_pad: int

    @classmethod
    def from_model(cls, config, tokenizer) -> "ChatTokens":
        thinker = config.thinker_config
        newline = tokenizer.encode("\n", add_special_tokens=False)
        assert len(newline) == 1, "the tokenizer must encode a newline as one token"
        return cls(
            im_start=config.im_start_token_id,
            im_end=config.im_end_token_id,
            newline=newline[0],
            system=config.system_token_id,
            user=config.user_token_id,
            assistant=config.assistant_token_id,
            audio_start=thinker.audio_start_token_id,
            audio_end=thinker.audio_end_token_id,
            audio_pad=thinker.audio_token_id,
        )

    def system_ids(self, tokenizer, prompt: str) -> list[int]:
        """`<|im_start|>system\\n{prompt}<|im_end|>\\n`, or nothing for an empty prompt."""
        if not prompt:
            return []
        body = tokenizer.encode(prompt, add_special_tokens=False)
        return [self.im_start, self.system, self.newline, *body, self.im_end, self.newline]

    def user_head(self) -> list[int]:
        """What opens a user voice turn, before any audio token."""
        return [self.im_start, self.user, self.newline, self.audio_start]

    def user_tail(self) -> list[int]:
        """What closes a user voice turn after its audio tokens (all of it still user-role)."""
        return [self.audio_end, self.im_end, self.newline]

    def assistant_head(self) -> list[int]:
        return [self.im_start, self.assistant, self.newline]

    def assistant_tail(self) -> list[int]:
        """Closes a reply in the history (whether it ended on its own, ran out or was cut)."""
        return [self.im_end, self.newline]

    def user_turn(self, n_audio_tokens: int) -> list[int]:
        return [*self.user_head(), *([self.audio_pad] * n_audio_tokens), *self.user_tail()]


def audio_token_count(mel_frames: int) -> int:
    """Audio tokens the encoder makes from `mel_frames` frames (the processor's formula)."""
    full, rest = divmod(mel_frames, MEL_FRAMES_PER_CHUNK)
    tokens = full * TOKENS_PER_FULL_CHUNK
    if rest:
        after_conv = (rest - 1) // 2 + 1
        tokens += ((after_conv - 1) // 2 + 1 - 1) // 2 + 1
    return tokens
