"""Voice activity: Silero VAD probabilities turned into speech-start / speech-end events.

`SileroVad` gives the speech probability of one 32 ms window. `VoiceActivity` is a streaming
state machine over any chunking of 16 kHz audio (live microphone or a file read block by block);
the session's `SilencePolicy` (session/policy.py) runs it for both `talk` and `replay`. All sample
indices count 16 kHz samples from the first sample fed (for a file: from its start).

Rules (settings from `[vad]`): speech starts at the first window whose probability reaches
`threshold`, and is reported once the probability has stayed at or above `neg_threshold` for
`min_speech_ms` (shorter blips are dropped). Silence starts at the first window under
`neg_threshold` (a window at or above `threshold` cancels it); the turn ends, at that silence
start, once the silence has lasted `end_of_turn_ms`. The turn's audio begins `pre_roll_ms` before
the onset, but never before the previous turn's end nor before sample 0.
"""

from __future__ import annotations

import enum
import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from duplex_chat.config import DuplexError, VadSettings

from .constants import SAMPLE_RATE, VAD_WINDOW_SAMPLES, ms_to_samples

REINSTALL_HINT = "Reinstall it with `pip install --force-reinstall silero-vad`."

# The ONNX export that the silero-vad package ships beside its TorchScript model (the same
# network: their probabilities agree within 4e-6 on speech). onnxruntime runs a window in half
# the time TorchScript takes (1.3 vs 2.5 ms when it runs between other work, as in `talk`: about
# 4 % of a core at idle), releases the GIL meanwhile, and needs no torch threads set or
# warnings hidden.
SILERO_ONNX_FILE = "silero_vad.onnx"
CONTEXT_SAMPLES = 64  # the model sees each window with the previous window's last 64 samples
STATE_SHAPE = (2, 1, 128)  # its recurrent state: (layers, batch, hidden)


class SileroVad:
    """Silero VAD (the ONNX model bundled with the silero-vad package, run by onnxruntime on
    one thread).

    Stateful: each call continues from the previous window; call `reset()` between streams.
    Raises DuplexError when the package, its model or onnxruntime cannot be loaded.
    """

    def __init__(self) -> None:
        path = silero_model_path()
        try:
            import onnxruntime as ort
        except ImportError as exc:
            raise DuplexError(f"Silero VAD needs onnxruntime, which cannot be imported ({exc}).",
                              hint="pip install onnxruntime") from None
        options = ort.SessionOptions()
        # One thread: the model is far too small to gain from more, and on a loaded 2-core
        # machine a second thread made each window 10-100x slower (measured with torch).
        options.intra_op_num_threads = 1
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        try:
            self._session = ort.InferenceSession(str(path), sess_options=options,
                                                 providers=["CPUExecutionProvider"])
        except Exception as exc:  # a damaged file or a broken onnxruntime install
            raise DuplexError(f"Could not load the Silero VAD model {path} ({exc}).",
                              hint=REINSTALL_HINT) from None
        self._rate = np.array(SAMPLE_RATE, np.int64)
        self.reset()

    def prob(self, window: np.ndarray) -> float:
        """Speech probability in [0, 1] of one window: float32 array of shape (512,) at 16 kHz."""
        if window.shape != (VAD_WINDOW_SAMPLES,):
            raise ValueError(
                f"VAD window must have shape ({VAD_WINDOW_SAMPLES},), got {window.shape}"
            )
        # (1, 64 + 512): the last window's tail, then this window
        model_input = np.concatenate([self._context, window.astype(np.float32, copy=False)])[None]
        out, self._state = self._session.run(
            None, {"input": model_input, "state": self._state, "sr": self._rate})
        self._context = model_input[0, -CONTEXT_SAMPLES:]
        return float(out[0, 0])

    def reset(self) -> None:
        """Forget the recurrent state and audio context (start of a new stream)."""
        self._state = np.zeros(STATE_SHAPE, np.float32)
        self._context = np.zeros(CONTEXT_SAMPLES, np.float32)


def silero_model_path() -> Path:
    """Where the installed silero-vad package keeps its ONNX model. Found without importing the
    package: its import loads torch models and sets torch's thread count to 1 for the process."""
    spec = importlib.util.find_spec("silero_vad")
    if spec is None or not spec.submodule_search_locations:
        raise DuplexError("The silero-vad package is not installed.", hint=REINSTALL_HINT)
    path = Path(next(iter(spec.submodule_search_locations))) / "data" / SILERO_ONNX_FILE
    if not path.is_file():
        raise DuplexError(f"The Silero VAD model {path} is missing.", hint=REINSTALL_HINT)
    return path


class SpeechProbability(Protocol):
    """What `VoiceActivity` needs from a VAD model (`SileroVad`, or a stand-in in tests)."""

    def prob(self, window: np.ndarray) -> float: ...

    def reset(self) -> None: ...


@dataclass(frozen=True)
class SpeechStarted:
    """Speech was confirmed; `sample_index` is its onset, `audio_start_index` onset − pre-roll."""

    sample_index: int
    audio_start_index: int


@dataclass(frozen=True)
class SpeechEnded:
    """The turn ended; `sample_index` is where its final silence began (exclusive end)."""

    sample_index: int


VadEvent = SpeechStarted | SpeechEnded


class _State(enum.Enum):
    SILENCE = "silence"
    CANDIDATE = "candidate"  # above threshold, not yet min_speech_ms long
    SPEECH = "speech"


class VoiceActivity:
    """Streaming speech detector: `feed` 16 kHz float32 samples in chunks of any size, get events.

    Works on whole 512-sample windows; up to 511 samples wait for the next `feed`, so an event
    can come up to one window (32 ms) after the chunk that completes it.
    """

    def __init__(self, settings: VadSettings, vad: SpeechProbability | None = None):
        self.settings = settings
        self.vad = vad if vad is not None else SileroVad()
        self._min_speech = ms_to_samples(settings.min_speech_ms)
        self._end_of_turn = ms_to_samples(settings.end_of_turn_ms)
        self._pre_roll = ms_to_samples(settings.pre_roll_ms)
        self.reset()

    def reset(self) -> None:
        """Start a new stream: sample indices restart at 0 and the model forgets its state."""
        self.vad.reset()
        self._carry = np.zeros(0, np.float32)  # < 512 samples waiting for a full window
        self._next_window = 0  # sample index where the next window starts
        self._state = _State.SILENCE
        self._onset = 0
        self._silence_start: int | None = None
        self._last_end = 0  # previous turn's end: the pre-roll never reaches before it
        self.last_prob = 0.0

    @property
    def in_speech(self) -> bool:
        """True between a SpeechStarted and its SpeechEnded."""
        return self._state is _State.SPEECH

    @property
    def silence_start(self) -> int | None:
        """In speech: the sample where the current silence began (None while speech goes on);
        None outside speech."""
        return self._silence_start if self._state is _State.SPEECH else None

    @property
    def samples_fed(self) -> int:
        """All samples fed since the last reset (including those waiting for a full window)."""
        return self._next_window + len(self._carry)

    def feed(self, samples: np.ndarray) -> list[VadEvent]:
        """Take the next chunk, shape (n,) float in [-1, 1] at 16 kHz; return the events it
        completed, in order."""
        data = np.asarray(samples)
        if data.dtype.kind not in "f" or data.ndim != 1:
            raise ValueError(f"VAD input must be float samples of shape (n,), got "
                             f"{data.dtype} {data.shape}")
        data = np.concatenate([self._carry, data.astype(np.float32, copy=False)])
        n_windows = len(data) // VAD_WINDOW_SAMPLES
        events = []
        for i in range(n_windows):
            window = data[i * VAD_WINDOW_SAMPLES : (i + 1) * VAD_WINDOW_SAMPLES]
            self.last_prob = self.vad.prob(window)
            event = self._step(self.last_prob, self._next_window)
            self._next_window += VAD_WINDOW_SAMPLES
            if event is not None:
                events.append(event)
        self._carry = data[n_windows * VAD_WINDOW_SAMPLES :].copy()
        return events

    def finish(self) -> list[VadEvent]:
        """End of stream: close an open turn at its silence start, or at the last sample fed."""
        events: list[VadEvent] = []
        if self._state is _State.SPEECH:
            end = self._silence_start if self._silence_start is not None else self.samples_fed
            events.append(self._end_turn(end))
        self._state = _State.SILENCE
        return events

    def end_turn(self) -> SpeechEnded:
        """End the open turn now, at its silence start: a turn policy decided before
        `end_of_turn_ms` (session/smart_turn.py). Only in speech, during a silence."""
        if self._state is not _State.SPEECH or self._silence_start is None:
            raise RuntimeError("end_turn needs an open turn in a silence")
        return self._end_turn(self._silence_start)

    def _step(self, p: float, start: int) -> VadEvent | None:
        """Advance by one window starting at sample `start` with speech probability `p`."""
        s = self.settings
        if self._state is _State.SILENCE and p >= s.threshold:
            self._state, self._onset = _State.CANDIDATE, start
        elif self._state is _State.CANDIDATE and p < s.neg_threshold:
            self._state = _State.SILENCE  # a blip shorter than min_speech_ms
        if self._state is _State.CANDIDATE:
            if start + VAD_WINDOW_SAMPLES - self._onset < self._min_speech:
                return None
            self._state, self._silence_start = _State.SPEECH, None
            audio_start = max(self._onset - self._pre_roll, self._last_end, 0)
            return SpeechStarted(self._onset, audio_start)
        if self._state is _State.SPEECH:
            return self._speech_step(p, start)
        return None

    def _speech_step(self, p: float, start: int) -> VadEvent | None:
        if p >= self.settings.threshold:
            self._silence_start = None
        elif p < self.settings.neg_threshold and self._silence_start is None:
            self._silence_start = start
        if self._silence_start is None:
            return None
        if start + VAD_WINDOW_SAMPLES - self._silence_start >= self._end_of_turn:
            return self._end_turn(self._silence_start)
        return None

    def _end_turn(self, end: int) -> SpeechEnded:
        self._state, self._last_end, self._silence_start = _State.SILENCE, end, None
        return SpeechEnded(end)
