"""The semantic end of turn: Smart Turn v3.2 asked at each pause whether the user has finished.

`SmartTurnPolicy` is a `TurnPolicy` (policy.py). Voice activity works as in `SilencePolicy`
(the same `VoiceActivity`), but a turn ends in one of two ways:

- after `turn.pause_ms` of silence the policy asks the model, once per pause, whether the turn
  is complete; if its probability is at least `turn.threshold`, the turn ends (at the start of
  that silence) as soon as the answer arrives. If not, the policy waits: speech resuming opens
  a new pause and a new question later;
- `turn.fallback_ms` of silence always ends it, whatever the model said or whether it answered.

The model. Smart Turn v3.2 (Daily's pipecat, BSD-2 licence) is an 8.7 MB ONNX audio classifier
on a Whisper-style encoder: it hears the last 8 s of the turn (16 kHz, left-padded with zeros),
as 80-bin log-mel features of the zero-mean unit-variance waveform, and returns P(complete). The
file ships with duplex-chat, unchanged, in `session/data/` with its licence (README, "Turn
policies", says why it is not fetched from the pipecat-ai package); onnxruntime runs it on one
CPU thread. `smart_turn_features` is our own implementation of those features (the Whisper
recipe, with transformers' mel filter bank); tests/test_smart_turn.py checks it against the
reference in the pipecat-ai wheel when that wheel is at hand.

Off the audio thread. One call costs about 10 ms on a fast CPU and 80 ms on a small one, too
long for a loop that runs every 10 ms. A policy built with `virtual_clock=False` (talk, serve)
hands the question to its own worker thread and picks the answer up on a later `feed`: `feed`
never waits for the model. With `virtual_clock=True` (replay, whose session runs on the file's
clock) the model is run at once but its answer is delivered only once the clock has passed the
question's time plus `MODELED_INFERENCE_S`, so a replay's turns never depend on how busy the
machine is (as `VirtualPlayer` models the first packet).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import queue
import threading
from importlib import resources
from pathlib import Path
from typing import Protocol

import numpy as np

from duplex_chat.audio.constants import SAMPLE_RATE, VAD_WINDOW_SAMPLES, ms_to_samples
from duplex_chat.audio.vad import (
    SileroVad,
    SpeechEnded,
    SpeechProbability,
    SpeechStarted,
    VadEvent,
    VoiceActivity,
)
from duplex_chat.config import DuplexError, TurnSettings, VadSettings

from .policy import OnsetTap

MODEL_FILE = "smart-turn-v3.2-cpu.onnx"
MODEL_SHA256 = "2bb026316b14a660486a75b1733cd3fbab8c2fd0314dc9af7be49f8cca967e4f"
MODEL_INPUT = "input_features"  # the ONNX graph's input: (batch, N_MELS, N_FRAMES) float32

WINDOW_S = 8  # seconds of audio the model hears: the last 8 s of the turn
WINDOW_SAMPLES = WINDOW_S * SAMPLE_RATE
N_MELS = 80  # Whisper's 80 mel bins (Qwen3-Omni's encoder uses 128: audio/features.py)
N_FFT = 400  # 25 ms periodic Hann window
HOP = 160  # 10 ms
N_FRAMES = WINDOW_SAMPLES // HOP  # 800 frames (the last STFT frame is dropped, as Whisper does)
NORM_EPS = 1e-7  # variance epsilon of the waveform normalisation (transformers' do_normalize)
POWER_FLOOR = 1e-10
DYNAMIC_RANGE_LOG10 = 8.0  # 80 dB under the loudest bin
MODEL_THREADS = 1  # onnxruntime intra-op threads: leave the other cores to the audio and engine

# What replay charges each model call on its virtual clock: about one call on a small 2-core CPU
# (83 ms measured here), so a replay does not promise a faster decision than a slow machine gives.
MODELED_INFERENCE_S = 0.08


def model_path() -> Path:
    """The packaged Smart Turn v3.2 ONNX file."""
    return Path(str(resources.files("duplex_chat.session") / "data" / MODEL_FILE))


@functools.cache
def _mel_filters() -> np.ndarray:
    """Slaney mel filter bank (N_MELS, 201) float64, as Whisper's feature extractor builds it."""
    from transformers.audio_utils import mel_filter_bank

    filters = mel_filter_bank(num_frequency_bins=N_FFT // 2 + 1, num_mel_filters=N_MELS,
                              min_frequency=0.0, max_frequency=SAMPLE_RATE / 2,
                              sampling_rate=SAMPLE_RATE, norm="slaney", mel_scale="slaney")
    return np.ascontiguousarray(filters.T)


@functools.cache
def _hann() -> np.ndarray:
    """Periodic Hann window of N_FFT samples (torch.hann_window's), float64."""
    n = np.arange(N_FFT)
    return 0.5 - 0.5 * np.cos(2.0 * np.pi * n / N_FFT)


def fit_window(audio: np.ndarray) -> np.ndarray:
    """The model's 8 s: the last WINDOW_SAMPLES of `audio`, left-padded with zeros, float32."""
    x = np.asarray(audio, dtype=np.float32)[-WINDOW_SAMPLES:]
    return np.concatenate([np.zeros(WINDOW_SAMPLES - len(x), np.float32), x])


def smart_turn_features(audio: np.ndarray) -> np.ndarray:
    """Smart Turn v3's input for one turn: (N_MELS, N_FRAMES) float32.

    audio: (n,) float at 16 kHz, the turn so far (its last 8 s are used, left-padded with zeros).
    Steps (Whisper's extractor with an 8 s chunk and waveform normalisation): (x - mean) /
    sqrt(var + 1e-7) in float32; STFT in float64 with 200 samples of reflect padding at each end,
    a periodic Hann window of 400 and hop 160; power; slaney mel bank; log10 of max(., 1e-10);
    the last frame dropped; floor at the loudest bin - 8; (x + 4) / 4.
    """
    x = fit_window(audio)
    x = (x - x.mean()) / np.sqrt(x.var() + NORM_EPS)
    padded = np.pad(x.astype(np.float64), N_FFT // 2, mode="reflect")
    starts = np.arange(N_FRAMES) * HOP  # the 801st frame would be dropped: never computed
    frames = padded[starts[:, None] + np.arange(N_FFT)] * _hann()
    spectrum = np.fft.rfft(frames, axis=-1)
    power = spectrum.real ** 2 + spectrum.imag ** 2  # (N_FRAMES, 201)
    log_mel = np.log10(np.maximum(_mel_filters() @ power.T, POWER_FLOOR))
    log_mel = np.maximum(log_mel, log_mel.max() - DYNAMIC_RANGE_LOG10)
    return ((log_mel + 4.0) / 4.0).astype(np.float32)


class TurnModel(Protocol):
    """What the policy asks: P(the turn is complete) of the turn's audio so far."""

    def prob(self, audio: np.ndarray) -> float: ...


class SmartTurnModel:
    """Smart Turn v3.2 through onnxruntime, on MODEL_THREADS CPU thread(s).

    Raises DuplexError when onnxruntime is missing or the model file is missing or altered.
    """

    def __init__(self, path: str | Path | None = None):
        try:
            import onnxruntime as ort
        except ImportError as exc:
            raise DuplexError(f"turn.policy = smart needs onnxruntime, which cannot be imported "
                              f"({exc}).", hint="pip install onnxruntime") from None
        self.path = Path(path) if path is not None else model_path()
        _check_model_file(self.path)
        options = ort.SessionOptions()
        options.intra_op_num_threads = MODEL_THREADS
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        try:
            self._session = ort.InferenceSession(str(self.path), sess_options=options,
                                                 providers=["CPUExecutionProvider"])
        except Exception as exc:  # a broken onnxruntime install, or a file it cannot read
            raise DuplexError(f"onnxruntime could not load the Smart Turn model {self.path} "
                              f"({exc}).") from None

    def prob(self, audio: np.ndarray) -> float:
        """P(complete) in [0, 1] of the turn's audio (n,) float at 16 kHz."""
        features = smart_turn_features(audio)[None]
        (out,) = self._session.run(None, {MODEL_INPUT: features})[:1]
        return float(np.asarray(out).reshape(-1)[0])


def _check_model_file(path: Path) -> None:
    if not path.is_file():
        raise DuplexError(f"The Smart Turn model {path} is missing.",
                          hint="Reinstall duplex-chat (the file ships with it).")
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if path.name == MODEL_FILE and digest != MODEL_SHA256:
        raise DuplexError(f"The Smart Turn model {path} is damaged (sha256 {digest[:12]}…, "
                          f"expected {MODEL_SHA256[:12]}…).",
                          hint="Reinstall duplex-chat (the file ships with it).")


# ---- asking the model without waiting ------------------------------------------------------
class ThreadedAsker:
    """Runs the model on its own daemon thread: `ask` queues, `answers` collects what is done.

    Questions are answered in order, one at a time. A model error is raised by the next
    `answers` call (on the caller's thread)."""

    def __init__(self, model: TurnModel):
        self.model = model
        self._questions: queue.SimpleQueue = queue.SimpleQueue()
        self._answers: queue.SimpleQueue = queue.SimpleQueue()
        self._thread: threading.Thread | None = None

    def ask(self, key: int, audio: np.ndarray, now: int) -> None:
        """Queue the question `key` about `audio`, asked at session sample `now` (unused here)."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="smart-turn", daemon=True)
            self._thread.start()
        self._questions.put((key, audio))

    def answers(self, now: int) -> list[tuple[int, float]]:
        """(key, P(complete)) of the questions answered since the last call; never blocks."""
        out = []
        while True:
            try:
                key, result = self._answers.get_nowait()
            except queue.Empty:
                return out
            if isinstance(result, BaseException):
                raise result
            out.append((key, result))

    def close(self) -> None:
        """Let the thread end (after the question it is on, if any)."""
        if self._thread is not None:
            self._questions.put(None)
            self._thread = None

    def _run(self) -> None:
        while (item := self._questions.get()) is not None:
            key, audio = item
            try:
                self._answers.put((key, float(self.model.prob(audio))))
            except Exception as exc:  # handed to the session's thread, which raises it
                self._answers.put((key, exc))


class VirtualAsker:
    """For a session on a virtual clock (replay): answers at once, delivered `delay` samples of
    the session's clock after the question, so results never depend on the machine's speed."""

    def __init__(self, model: TurnModel, delay_samples: int):
        self.model, self.delay = model, delay_samples
        self._due: list[tuple[int, int, float]] = []  # (due sample, key, prob)

    def ask(self, key: int, audio: np.ndarray, now: int) -> None:
        self._due.append((now + self.delay, key, float(self.model.prob(audio))))

    def answers(self, now: int) -> list[tuple[int, float]]:
        ready = [(key, p) for due, key, p in self._due if due <= now]
        self._due = [item for item in self._due if item[0] > now]
        return ready

    def close(self) -> None:
        self._due = []


class Asker(Protocol):
    def ask(self, key: int, audio: np.ndarray, now: int) -> None: ...

    def answers(self, now: int) -> list[tuple[int, float]]: ...

    def close(self) -> None: ...


# ---- the policy ----------------------------------------------------------------------------
class _Recent:
    """The last `capacity` samples fed, as a ring; `since(start)` copies samples start..now."""

    def __init__(self, capacity: int):
        self.buffer = np.zeros(capacity, np.float32)
        self.total = 0

    def append(self, samples: np.ndarray) -> None:
        cap = len(self.buffer)
        tail = samples[-cap:]
        pos = (self.total + len(samples) - len(tail)) % cap
        first = min(len(tail), cap - pos)
        self.buffer[pos:pos + first] = tail[:first]
        self.buffer[:len(tail) - first] = tail[first:]
        self.total += len(samples)

    def since(self, start: int) -> np.ndarray:
        start = max(start, self.total - len(self.buffer), 0)
        idx = np.arange(start, self.total) % len(self.buffer)
        return self.buffer[idx]


@dataclasses.dataclass
class _Question:
    key: int
    silence_start: int  # the pause it is about
    asked_at: int


class SmartTurnPolicy:
    """A `TurnPolicy`: VAD onsets, and an end of turn at a pause the model calls complete, or
    after `turn.fallback_ms` of silence (module docstring).

    `model`: anything with `prob(audio)` (a `SmartTurnModel` is loaded when None). `vad`: the
    speech-probability model (an `OnsetTap` wraps it, as in `SilencePolicy`).
    `virtual_clock`: answer on the session's clock (replay) instead of a worker thread.
    `last_prob` is the last answer delivered (None before any), for views and tests.
    """

    def __init__(self, vad_settings: VadSettings, turn: TurnSettings,
                 vad: SpeechProbability | None = None, model: TurnModel | None = None, *,
                 virtual_clock: bool = False, inference_s: float = MODELED_INFERENCE_S):
        self.tap = OnsetTap(vad if vad is not None else SileroVad(), vad_settings.threshold)
        # the VAD's own end of turn is the fallback
        fallback = dataclasses.replace(vad_settings, end_of_turn_ms=turn.fallback_ms)
        self.activity = VoiceActivity(fallback, self.tap)
        self.pause = ms_to_samples(turn.pause_ms)
        self.threshold = turn.threshold
        self.model = model if model is not None else SmartTurnModel()
        self.asker: Asker = (VirtualAsker(self.model, round(inference_s * SAMPLE_RATE))
                             if virtual_clock else ThreadedAsker(self.model))
        self.recent = _Recent(WINDOW_SAMPLES)
        self.turn_start = 0  # audio start (pre-roll included) of the open turn
        self.question: _Question | None = None  # the one whose answer can still end the turn
        self.asked_for: int | None = None  # silence start of the last pause asked about
        self.keys = 0
        self.last_prob: float | None = None
        self.questions_asked = 0
        self.ended_by_model = 0
        self.ended_by_fallback = 0

    @property
    def speech_run(self) -> int:
        """See `TurnPolicy.speech_run`."""
        return self.tap.run

    @property
    def pause_start(self) -> int | None:
        """See `TurnPolicy.pause_start`: the VAD's silence start, whatever the model says."""
        return self.activity.silence_start

    def feed(self, samples: np.ndarray) -> list[VadEvent]:
        """See `TurnPolicy.feed`. Never waits for the model: an answer that is not in yet is
        picked up by a later call."""
        data = np.asarray(samples, dtype=np.float32)
        events: list[VadEvent] = []
        done = 0
        while done < len(data):  # one VAD window at most per step, so a pause is seen on time
            n = min(len(data) - done,
                    VAD_WINDOW_SAMPLES - self.activity.samples_fed % VAD_WINDOW_SAMPLES)
            piece = data[done:done + n]
            done += n
            self.recent.append(piece)
            for event in self.activity.feed(piece):
                self._vad_event(event, fallback=True)
                events.append(event)
            self._maybe_ask()
            events.extend(self._collect())
        if not len(data):
            events.extend(self._collect())
        return events

    def finish(self) -> list[VadEvent]:
        """See `TurnPolicy.finish`: an open turn ends at its silence start or the last sample."""
        events = self.activity.finish()
        for event in events:
            self._vad_event(event, fallback=False)
        return events

    def close(self) -> None:
        """Stop the model's thread."""
        self.asker.close()

    def _vad_event(self, event: VadEvent, fallback: bool) -> None:
        if isinstance(event, SpeechStarted):
            self.turn_start = event.audio_start_index
        elif isinstance(event, SpeechEnded):  # the fallback (or finish): any answer is too late
            self.question = None
            self.ended_by_fallback += int(fallback)

    def _maybe_ask(self) -> None:
        silence = self.activity.silence_start
        now = self.activity.samples_fed
        if (not self.activity.in_speech or silence is None or silence == self.asked_for
                or now - silence < self.pause):
            return
        self.asked_for = silence
        self.keys += 1
        self.question = _Question(self.keys, silence, now)
        self.questions_asked += 1
        self.asker.ask(self.keys, self.recent.since(self.turn_start), now)

    def _collect(self) -> list[VadEvent]:
        now = self.activity.samples_fed
        events: list[VadEvent] = []
        for key, p in self.asker.answers(now):
            question = self.question
            if question is None or key != question.key:
                continue  # about a pause the user spoke through, or a turn already over
            self.question, self.last_prob = None, p
            if (p >= self.threshold and self.activity.in_speech
                    and self.activity.silence_start == question.silence_start):
                events.append(self.activity.end_turn())
                self.ended_by_model += 1
        return events
