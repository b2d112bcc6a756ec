"""Comparing the engine with generate(), every token and every code, and the one way a choice
may differ: a tie that rounding decides.

`reference(...)` runs generate() on a conversation and keeps, besides its text and codes, the
logits behind each of its choices: the thinker's for each reply token, the talker's for each
frame's code 0, the code predictor's for codebooks 1-15. `Judge` then stands in for the engine's
three samplers while it replies to the same conversation: each engine choice is compared with
generate()'s at the same step. Where they differ, the difference is accepted only as a tie
decided by rounding, which takes both of

- the step's inputs agree to `INPUTS_AGREE` (the state the head reads, recovered from the
  engine's and generate()'s logits: the head is the same linear map on both sides, with far more
  rows than columns, so its least-squares inverse gives the input difference exactly; what it
  leaves unexplained must be under `TIE_MARGIN`, too small to flip a choice by itself), and
- generate()'s own margin between its choice and the engine's (its top-2 margin, when the
  engine took its runner-up) is under `TIE_MARGIN`;

then generate()'s choice is forced into the engine and the comparison goes on. Anything else
fails, naming the step and both figures. Inside a CUDA graph the samplers are not called from
Python, so there any difference fails as it stands.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import numpy as np
import torch

from duplex_chat.audio.features import StreamingMel
from duplex_chat.model.bench import synthetic_voice
from duplex_chat.model.events import AudioPacket, TextDelta
from duplex_chat.model.reference import ReferenceReply, reference_reply

INPUTS_AGREE = 1e-6  # max abs difference of the head's input state (float32, CPU)
TIE_MARGIN = 1e-5  # generate()'s best minus its second-best score
WAVE_TOLERANCE = 1e-4  # streamed waveform vs generate()'s one-piece code2wav (float32)


def user_audio(seconds: float, seed: int) -> np.ndarray:
    """Speech-like test audio (the benchmark's synthetic voice)."""
    return synthetic_voice(seconds, seed)


def mel_of(audio: np.ndarray) -> torch.Tensor:
    """The features the engine's streaming extractor makes, for generate() (see test_features)."""
    mel = StreamingMel()
    return torch.cat([mel.feed(audio), mel.finish()], dim=1)


@dataclass
class Reference:
    """generate()'s reply and the logits (vocab,) behind each of its choices."""

    reply: ReferenceReply
    thinker: list[torch.Tensor]  # [i]: reply token i
    talker: list[torch.Tensor]  # [f]: frame f's code 0 (one more than frames where it ended)
    predictor: list[list[torch.Tensor]]  # [k - 1][f]: frame f's codebook k
    states: dict[str, list[torch.Tensor]]  # the thinker's and talker's head inputs (d,), as above

    @property
    def frames(self) -> int:
        return self.reply.codes.shape[1]


def reference(bundle, settings, features: list[torch.Tensor], replies: list[list[int]],
              max_frames: int) -> Reference:
    """generate() on the conversation, with the engine's encoder window and reply limits."""
    model = bundle.model
    heads = {"thinker": model.thinker.lm_head, "talker": model.talker.codec_head}
    seen: dict[str, list] = {name: [] for name in heads}
    states: dict[str, list] = {name: [] for name in heads}
    predictor: list[list[torch.Tensor]] = [[] for _ in model.talker.code_predictor.lm_head]

    def keep(sink: list, state_sink: list | None = None):
        def hook(_module, inputs, out):
            sink.append(_last(out))
            if state_sink is not None:
                state_sink.append(_last(inputs[0]))
        return hook

    hooks = [head.register_forward_hook(keep(seen[name], states[name]))
             for name, head in heads.items()]
    hooks += [head.register_forward_hook(keep(sink))
              for head, sink in zip(model.talker.code_predictor.lm_head, predictor)]
    try:
        reply = reference_reply(bundle, settings.qwen, features, replies, max_frames=max_frames,
                                encoder_window_s=settings.qwen.encoder_window_s)
    finally:
        for hook in hooks:
            hook.remove()
    assert reply.codes is not None and reply.codes.shape[1] > 0
    ref = Reference(reply, seen["thinker"], seen["talker"], predictor, states)
    assert len(ref.thinker) == len(reply.reply_ids)  # one head call per token: read right
    caught = torch.stack([torch.stack(book[:ref.frames]).argmax(-1) for book in predictor])
    assert torch.equal(caught.to(reply.codes.device), reply.codes[1:])
    return ref


def _last(x: torch.Tensor) -> torch.Tensor:
    """The last position of (..., n, d) as float32 (d,)."""
    return x.reshape(-1, x.shape[-1])[-1].float()


@dataclass
class Forced:
    stage: str
    step: int
    engine: int
    generate: int
    margin: float
    inputs_apart: float


class _Stand:
    """One stage's sampler, compared step by step with generate()'s choices."""

    def __init__(self, judge: "Judge", stage: str, sampler, decisions, head_of, describe):
        """decisions[step]: (generate()'s choice, its logits); head_of(step): the weight of the
        head that made that step's logits (vocab, d); describe(step): the step in words."""
        self.judge, self.stage, self.sampler = judge, stage, sampler
        self.decisions, self.head_of, self.describe = decisions, head_of, describe
        self.calls = 0

    def __getattr__(self, name):  # graph_safe() and the rest: the real sampler's (not judged)
        return getattr(self.sampler, name)

    def __call__(self, logits, **kwargs):
        step, self.calls = self.calls, self.calls + 1
        choice = self.sampler(logits, **kwargs)
        if step >= len(self.decisions):  # past generate()'s reply (a frame launched ahead)
            return choice
        wanted, ref_logits = self.decisions[step]
        if int(choice) == wanted:
            return choice
        ref_logits = ref_logits.to(logits.device)
        scores = self.sampler._penalized(ref_logits, kwargs.get("seen"))
        margin = float(scores[wanted] - scores[int(choice)])  # the runner-up's: the top-2 margin
        weight = self.head_of(step).detach().float().cpu()  # (vocab, d)
        apart = (logits.float() - ref_logits).cpu()[:, None]  # (vocab, 1)
        state = torch.linalg.lstsq(weight, apart).solution  # (d, 1)
        inputs_apart = float(state.abs().max())
        # What the state cannot explain (a bias, another logits processor) must not be able to
        # flip a choice on its own: no larger than a tie.
        unexplained = float((apart - weight @ state).abs().max())
        where = f"{self.stage} step {step} ({self.describe(step)})"
        assert inputs_apart < INPUTS_AGREE and margin < TIE_MARGIN and unexplained < TIE_MARGIN, (
            f"{where}: the engine chose {int(choice)}, generate() {wanted}; generate()'s margin "
            f"between them {margin:.2e} (a tie needs < {TIE_MARGIN:.0e}), the step's inputs "
            f"{inputs_apart:.2e} apart (a tie needs < {INPUTS_AGREE:.0e}), logits "
            f"{unexplained:.2e} apart beyond what the inputs explain (needs < {TIE_MARGIN:.0e})")
        self.judge.forced.append(Forced(self.stage, step, int(choice), wanted, margin, inputs_apart))
        return torch.tensor(wanted, device=choice.device)


@dataclass
class Judge:
    """Stands in for a conversation's samplers during one reply (see the module's docstring)."""

    conv: object
    ref: Reference
    forced: list[Forced] = field(default_factory=list)

    def __post_init__(self):
        conv, ref, model = self.conv, self.ref, self.conv.bundle.model
        codes = ref.reply.codes.cpu()
        books = codes.shape[0] - 1  # codebooks 1.. of a frame, from the predictor
        talker = [(int(codes[0, f]), ref.talker[f]) for f in range(ref.frames)]
        if ref.frames < conv.max_frames:  # generate() ended the speech: the engine must too
            talker.append((conv.codec_eos, ref.talker[ref.frames]))
        predictor = [(int(codes[k, f]), ref.predictor[k - 1][f])
                     for f in range(ref.frames) for k in range(1, books + 1)]
        heads = model.talker.code_predictor.lm_head
        self._saved = conv.thinker_sampler, conv.talker_sampler, conv.predictor_sampler
        conv.thinker_sampler = _Stand(
            self, "thinker", conv.thinker_sampler, list(zip(ref.reply.reply_ids, ref.thinker)),
            lambda i: model.thinker.lm_head.weight, lambda i: f"reply token {i}")
        conv.talker_sampler = _Stand(
            self, "talker", conv.talker_sampler, talker, lambda f: model.talker.codec_head.weight,
            lambda f: f"frame {f}, codebook 0")
        conv.predictor_sampler = _Stand(
            self, "predictor", conv.predictor_sampler, predictor,
            lambda i: heads[i % books].weight, lambda i: f"frame {i // books}, codebook {i % books + 1}")

    def restore(self) -> None:
        self.conv.thinker_sampler, self.conv.talker_sampler, self.conv.predictor_sampler = self._saved


def run_turn(conv, audio, chunk, cancel_after_packets=None, heard=0, events=None):
    """Feed `audio` in `chunk`-sample pieces, end the turn; returns (ids, waveform, events).
    `events`: the reply's events when the turn was already ended (a speculation held)."""
    for start in range(0, len(audio), chunk):
        conv.feed(audio[start:start + chunk])
    reply = conv.end_turn() if events is None else events
    ids, packets, events = [], [], []
    for event in reply:
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


@dataclass
class Compared:
    """A judged turn: what the engine did, what generate() did, and the ties forced."""

    ids: list[int]
    wave: np.ndarray
    events: list
    ref: Reference
    forced: list[Forced]


def judged_turn(conv, settings, audio, history_mels, replies, chunk=4000, already_fed=0,
                reference_bundle=None, **run) -> Compared:
    """Run one turn of `conv` judged against generate() on the same conversation: the earlier
    turns' mels `history_mels` with their replies `replies`, then `audio`, of which the caller
    fed the first `already_fed` samples already. generate() runs on `reference_bundle` if given
    (the same weights held differently), else on the conversation's own model."""
    features = [*history_mels, mel_of(audio)]
    ref = reference(reference_bundle or conv.bundle, settings, features, replies, conv.max_frames)
    judge = Judge(conv, ref)
    try:
        ids, wave, events = run_turn(conv, audio[already_fed:], chunk, **run)
    finally:
        judge.restore()
    return Compared(ids, wave, events, ref, judge.forced)


def assert_same_reply(conv, turn: Compared, text_prefix: bool = False) -> None:
    """Every token and every code equal to generate()'s (after any forced ties), and the
    streamed waveform equal to generate()'s. `text_prefix`: the engine's text may stop before
    generate()'s (the speech ended or was capped first; generate() writes all text first)."""
    ref = turn.ref.reply
    if text_prefix:
        assert turn.ids == ref.reply_ids[:len(turn.ids)]
    else:
        assert turn.ids == ref.reply_ids
    assert torch.equal(conv.last_codes.cpu(), ref.codes.cpu())
    expected = ref.waveform.cpu().numpy()
    assert turn.wave.shape == expected.shape
    worst = float(np.abs(turn.wave - expected).max())
    assert worst < WAVE_TOLERANCE, f"streamed waveform differs from generate()'s by {worst:.3g}"


@contextlib.contextmanager
def steered(head: torch.nn.Module, index: int, direction: torch.Tensor, scale: float):
    """While inside, `head` (an output layer) adds `scale * (state . direction)` to logit
    `index`, for the engine and generate() alike: a change of that id's row of the head, so it
    depends only on the state the head reads (done in a hook: the thinker's head may share its
    weights with the embeddings)."""
    def add(_module, inputs, out):
        out = out.clone()
        out[..., index] += scale * (inputs[0].float() @ direction).to(out.dtype)
        return out

    hook = head.register_forward_hook(add)
    try:
        yield
    finally:
        hook.remove()


def steering(states: list[torch.Tensor], gaps: list[float], earliest: int = 2):
    """How to make an id win first at one step of a greedy reply, by `steered`: states[i] is the
    head's input at step i and gaps[i] how far the id's score is behind the best there. For each
    step k from `earliest`, the direction is state k less the mean of the states before, and
    the scale halfway between the least that makes the id win at k and the most that keeps it
    behind at every step before. Returns (k, direction, scale, the least of those margins) for
    the k whose least margin is largest."""
    best = None
    for k in range(earliest, min(len(gaps), len(states))):
        direction = states[k] - torch.stack(states[:k]).mean(0)
        reach = [float(s @ direction) for s in states[:k + 1]]  # logit added per unit of scale
        if reach[k] <= 0:
            continue
        lowest = gaps[k] / reach[k]
        caps = [gaps[i] / reach[i] for i in range(k) if reach[i] > 0]
        highest = min(caps, default=3 * lowest)
        if highest <= lowest:
            continue
        scale = (lowest + highest) / 2
        least = min([scale * reach[k] - gaps[k]] + [gaps[i] - scale * reach[i] for i in range(k)])
        if best is None or least > best[3]:
            best = (k, direction, scale, least)
    assert best is not None, f"no step from {earliest} on can be made the first: {gaps}"
    return best
