"""The barge-in decision: is the user talking over the reply, or is that the reply's own echo?

Fast path: while a reply plays, BARGE_IN_WINDOWS consecutive VAD windows at or above
vad.threshold (64 ms of speech) interrupt it, long before the turn policy would confirm a turn
(min_speech_ms). The price: a cough of 64 ms can cut the reply short; a shorter one cannot.

With echo cancellation on, two checks guard against the reply interrupting itself:
- The onset must not look like the reply itself: its raw microphone samples must correlate less
  than ECHO_CORRELATION_MAX with every stretch of what played in the last ECHO_MAX_DELAY_S.
  Residual echo that AEC3 lets through after an echo path delay jump (seen after underruns) is a
  near-exact delayed copy (~1.0); espeak speech against a spoken reply stays under 0.8.
- AEC3 attenuates the user's voice by 10-50 dB while the reply plays if it has not learnt an echo
  path (none reaches the mic: a headset with echo cancellation left on, a muted speaker), which
  hid barge-ins. So a VAD on the raw microphone may also interrupt, but only when no echo reaches
  the mic: over the last ECHO_PROBE_S the raw mic stayed NO_ECHO_DB below the reply.
"""

from __future__ import annotations

import numpy as np

from duplex_chat.audio.constants import SAMPLE_RATE, VAD_WINDOW_SAMPLES
from duplex_chat.audio.echo import echo_correlation
from duplex_chat.audio.levels import SILENCE_DB, level_db
from duplex_chat.audio.vad import SpeechProbability

from .policy import OnsetTap

BARGE_IN_WINDOWS = 2  # consecutive speech windows (32 ms each) that interrupt the reply
HISTORY_S = 8.0  # cleaned mic audio kept for the pre-roll of a turn
# Normalised correlation, unitless in [0, 1] (audio/echo.py's `echo_correlation`), at or above
# which the onset of a barge-in is taken for the reply's own echo. 0.9 sits between the two
# cases measured: residual echo after an echo path delay jump is a near-exact delayed copy
# (~1.0), while espeak speech against a spoken reply stays under 0.8.
ECHO_CORRELATION_MAX = 0.9
ECHO_MAX_DELAY_S = 1.0  # longest echo path (device latencies + room) the checks consider
ECHO_PROBE_S = 0.5  # stretch of the reply whose echo must have arrived within ECHO_MAX_DELAY_S
# dB relative to the reply (a level difference, not dBFS): over the probe, the raw microphone's
# median window level must stay at least this far under the median window level of what played
# for the session to conclude that no echo reaches the mic (a headset, a muted speaker). Only
# then may the raw-mic VAD interrupt, since with an echo path speech on the raw mic may be the
# reply itself. Why 40: a loudspeaker the mic can hear leaves an echo much closer to the reply's
# level, so a wide margin keeps a real echo path from passing for none; the exact value is a
# margin chosen with that in mind, not a tuned threshold (no measurement of it is recorded here).
NO_ECHO_DB = -40.0
AUDIBLE_REPLY_DB = -45.0  # dBFS: median window level of the reply above which its echo would show


class History:
    """The last `seconds` of 16 kHz audio, addressed by absolute sample index.

    A ring: appending writes in place (at most two slices), so a 10 ms append costs the same
    whatever `seconds` is (shifting the whole buffer on each append cost `talk` ~4 % of a core
    at idle)."""

    def __init__(self, seconds: float = HISTORY_S):
        self._buf = np.zeros(int(seconds * SAMPLE_RATE), np.float32)
        self.total = 0  # samples ever appended; sample i is at _buf[i % capacity]

    @property
    def capacity(self) -> int:
        """Samples kept (`seconds` at 16 kHz)."""
        return len(self._buf)

    def append(self, x: np.ndarray) -> None:
        """Add x (n,) float32 at the end; the oldest samples fall out."""
        n = len(x)
        x = x[-self.capacity:]
        start = (self.total + n - len(x)) % self.capacity
        first = min(len(x), self.capacity - start)
        self._buf[start:start + first] = x[:first]
        self._buf[:len(x) - first] = x[first:]
        self.total += n

    def since(self, start: int) -> np.ndarray:
        """Samples from absolute index `start` to now (clipped to what is kept), a copy."""
        n = min(self.total - start, self.capacity)
        if n <= 0:
            return np.zeros(0, np.float32)
        begin = (self.total - n) % self.capacity
        if begin + n <= self.capacity:
            return self._buf[begin:begin + n].copy()
        return np.concatenate([self._buf[begin:], self._buf[:begin + n - self.capacity]])


class RawOnset:
    """An OnsetTap over a raw stream: cuts it into VAD windows itself (the raw-microphone VAD)."""

    def __init__(self, vad: SpeechProbability, threshold: float):
        self.tap = OnsetTap(vad, threshold)
        self._carry = np.zeros(0, np.float32)

    @property
    def run(self) -> int:
        """Consecutive speech windows on the raw stream, up to the last whole window."""
        return self.tap.run

    def feed(self, samples: np.ndarray) -> None:
        """Hear raw samples (n,) float32 at 16 kHz; a partial window waits for the next feed."""
        data = np.concatenate([self._carry, samples])
        n = len(data) // VAD_WINDOW_SAMPLES
        for k in range(n):
            self.tap.prob(data[k * VAD_WINDOW_SAMPLES:(k + 1) * VAD_WINDOW_SAMPLES])
        self._carry = data[n * VAD_WINDOW_SAMPLES:]

    def reset(self) -> None:
        """Forget the model's state, the run and any partial window."""
        self.tap.reset()
        self._carry = np.zeros(0, np.float32)


def _median_window_db(x: np.ndarray) -> float:
    """Median level of the VAD windows of x (n,): robust to a short burst of other sound."""
    n = len(x) // VAD_WINDOW_SAMPLES
    if n == 0:
        return SILENCE_DB
    return float(np.median([level_db(w) for w in x[:n * VAD_WINDOW_SAMPLES].reshape(n, -1)]))


class BargeIn:
    """Decides, window by window while a reply plays, whether the user interrupts it.

    `raw_vad`: a second VAD model for the raw microphone, given only when echo cancellation is on
    (then the echo checks above apply); None means no echo reaches the mic (headphones, a file).
    """

    def __init__(self, threshold: float, raw_vad: SpeechProbability | None = None):
        self.raw_onset = RawOnset(raw_vad, threshold) if raw_vad is not None else None
        span_s = ECHO_MAX_DELAY_S + ECHO_PROBE_S + 0.1
        self.raw = History(seconds=span_s)  # raw mic, for the echo checks
        self.played = History(seconds=span_s)  # what played, on the mic's clock
        self._echo_in_run = False  # the echo check turned down windows of the current run

    def hear(self, raw: np.ndarray, played: np.ndarray, replying: bool) -> None:
        """The raw microphone and what played over the same stretch (16 kHz); `replying`: a
        reply is in flight (the raw-mic VAD listens only then)."""
        self.raw.append(raw)
        self.played.append(played)
        if replying and self.raw_onset is not None:
            self.raw_onset.feed(raw)

    def reply_started(self) -> None:
        """The raw-mic VAD hears only replies: start each from a clean state."""
        if self.raw_onset is not None:
            self.raw_onset.reset()
        self._echo_in_run = False

    def run(self, speech_run: int) -> int:
        """Consecutive speech windows that count for a barge-in now (0 when they are echo).
        `speech_run`: the turn policy's run on the cleaned signal. When the run began as echo,
        only the windows the echo check let through count, so the barge-in's onset is where the
        user's voice came in, not where the echo did."""
        if self.raw_onset is None:
            return speech_run  # no echo to tell apart
        run = speech_run
        if self.raw_onset.run >= BARGE_IN_WINDOWS > run and self._no_echo_path():
            run = self.raw_onset.run
        if run < BARGE_IN_WINDOWS:
            self._echo_in_run = False
            return 0
        if self._onset_is_echo():
            self._echo_in_run = True
            return 0
        return BARGE_IN_WINDOWS if self._echo_in_run else run

    def _onset_is_echo(self) -> bool:
        """The onset windows' raw samples are a delayed copy of what played."""
        span = BARGE_IN_WINDOWS * VAD_WINDOW_SAMPLES
        mic = self.raw.since(self.raw.total - span)
        played = self.played.since(self.played.total - span - int(ECHO_MAX_DELAY_S * SAMPLE_RATE))
        return echo_correlation(mic, played) >= ECHO_CORRELATION_MAX

    def _no_echo_path(self) -> bool:
        """The reply was audible ECHO_MAX_DELAY_S + ECHO_PROBE_S ago, yet the raw mic stayed
        NO_ECHO_DB under it since: no echo reaches the microphone."""
        span = BARGE_IN_WINDOWS * VAD_WINDOW_SAMPLES
        probe = int(ECHO_PROBE_S * SAMPLE_RATE)
        reach = probe + int(ECHO_MAX_DELAY_S * SAMPLE_RATE)
        played = self.played.since(self.played.total - span - reach)[:probe]
        mic = self.raw.since(self.raw.total - span - reach)[:reach]
        if len(played) < probe or len(mic) < reach:
            return False  # too early in the session to tell
        reply_db = _median_window_db(played)
        return reply_db >= AUDIBLE_REPLY_DB and _median_window_db(mic) <= reply_db + NO_ECHO_DB
