"""Session recording for `talk --record DIR`: both sides' audio and a JSONL log, written as they happen.

Files in DIR (one set per session, named by its start time):
  <stamp>-mic.wav        what the microphone heard, 16 kHz mono float (before echo cancellation)
  <stamp>-assistant.wav  what the speaker played, 24 kHz mono float (silence included, so both
                         files share one timeline from the session start)
  <stamp>-events.jsonl   one JSON object per line: {"t": seconds since start, "type": ..., ...}

Every "type" is snake_case: the session's events under the names below (`session_event`), the
engine's under their class names in snake_case (`TurnFinished` -> "turn_finished"), and the
loop's own notes ("session_started", "streams_reopened", "error", "session_ended"...). Sample
indices count 16 kHz microphone samples from the session's start; reply samples are 24 kHz.

Audio is appended as it arrives, and each wav's header is rewritten to count it at least every
`FLUSH_INTERVAL_S` (1 s; audio/files.py's `WavWriter`); every log line is flushed at once. So a
crash, a `kill -9` or an unplugged device leaves files that sox, libsndfile and players read: the
audio up to the last flush (at most a second old) and every log line written. A session too long
for one wav (4 GiB: about 18 hours of mic, 12 of assistant) goes on in `<stamp>-mic-2.wav`...
"""

from __future__ import annotations

import dataclasses
import json
import re
import time
from pathlib import Path
from typing import Any

import numpy as np

from duplex_chat.audio.constants import OUTPUT_SAMPLE_RATE, SAMPLE_RATE
from duplex_chat.audio.files import WavWriter
from duplex_chat.config import DuplexError
from duplex_chat.model.events import AudioPacket
from duplex_chat.session import events as ev


def snake_case(name: str) -> str:
    """A class name as a log type: "TurnFinished" -> "turn_finished"."""
    return re.sub(r"(?<!^)(?=[A-Z])", "_", name).lower()


def event_record(event: Any) -> dict:
    """An engine event as a JSON-able dict: its type (snake_case) and fields; audio becomes its
    length."""
    record: dict[str, Any] = {"type": snake_case(type(event).__name__)}
    for f in dataclasses.fields(event):
        value = getattr(event, f.name)
        if isinstance(value, np.ndarray):
            record["samples"] = int(len(value))
        elif isinstance(value, tuple):
            record[f.name] = list(value)
        else:
            record[f.name] = value
    return record


class SessionRecorder:
    """Writes one session's audio and events into `directory` (created if needed)."""

    def __init__(self, directory: str | Path, clock=time.monotonic):
        self.directory = Path(directory)
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise DuplexError(f"Cannot create the recording directory {self.directory}: {exc}.") from None
        stamp = time.strftime("%Y%m%d-%H%M%S")
        self.mic_path = self.directory / f"{stamp}-mic.wav"
        self.assistant_path = self.directory / f"{stamp}-assistant.wav"
        self.events_path = self.directory / f"{stamp}-events.jsonl"
        self._clock = clock  # the log's timestamps (the wavs flush on their own clock)
        self._t0 = clock()
        self._mic = WavWriter(self.mic_path, SAMPLE_RATE, subtype="FLOAT")
        self._assistant = WavWriter(self.assistant_path, OUTPUT_SAMPLE_RATE, subtype="FLOAT")
        self._log = self.events_path.open("a", encoding="utf-8")
        self.closed = False

    def audio(self, mic_16k: np.ndarray, played_24k: np.ndarray) -> None:
        """Append the latest microphone (16 kHz) and played (24 kHz) samples, each (n,) float32."""
        if self.closed:
            return
        if len(mic_16k):
            self._mic.write(np.asarray(mic_16k, np.float32))
        if len(played_24k):
            self._assistant.write(np.asarray(played_24k, np.float32))

    def event(self, event: Any) -> None:
        """Log an engine event (AudioPacket logged without its samples)."""
        if isinstance(event, AudioPacket):
            self.note("audio_packet", turn=event.turn, start_sample=event.start_sample,
                      samples=int(len(event.samples)), frames=event.frames)
            return
        record = event_record(event)
        self.note(record.pop("type"), **record)

    def session_event(self, event: ev.SessionEvent) -> None:
        """Log a session event. Types and fields:
          speech_started       onset_sample, audio_start (onset minus pre-roll)
          user_turn_started    start_sample (only when the speech opens a turn)
          speech_ended         end_sample
          user_turn            turn, start_sample, end_sample, duration_s (a committed turn)
          user_turn_discarded  turn, start_sample, end_sample (open at close)
          reply_latency        turn, latency_ms, stages (the engine's ms marks so far)
          barge_in             turn, heard_samples (null: reported later), onset_sample,
                               detect_sample
          reply_stopped        turn, heard_samples (a reply cut by the session's close)
          history_cut          turn, heard_samples, text (what history kept), estimated
          reply_finished       turn, heard_samples (played to its end)
          barge_in_lapsed      (a barge-in that no turn followed)
          <engine event>       its fields (see `event`)
          <device trouble>     its kind ("streams_reopened", "error"), message, counters
        ReplyStarted is not logged: the engine's turn_started says the same."""
        if isinstance(event, ev.UserSpeechStarted):
            self.note("speech_started", onset_sample=event.onset_sample,
                      audio_start=event.audio_start)
            if event.turn_start is not None:
                self.note("user_turn_started", start_sample=event.turn_start)
        elif isinstance(event, ev.UserSpeechEnded):
            self.note("speech_ended", end_sample=event.end_sample)
        elif isinstance(event, ev.TurnCommitted):
            self.note("user_turn", turn=event.turn, start_sample=event.start_sample,
                      end_sample=event.end_sample, duration_s=round(event.duration_s, 3))
        elif isinstance(event, ev.TurnDiscarded):
            self.note("user_turn_discarded", turn=event.turn, start_sample=event.start_sample,
                      end_sample=event.end_sample)
        elif isinstance(event, ev.EngineEvent):
            self.event(event.event)
        elif isinstance(event, ev.ReplyAudible):
            self.note("reply_latency", turn=event.turn, latency_ms=round(event.latency_ms, 1),
                      stages=event.stages.stages if event.stages is not None else {})
        elif isinstance(event, ev.Interrupted) and event.cause == "close":
            self.note("reply_stopped", turn=event.turn, heard_samples=event.heard_samples)
        elif isinstance(event, ev.Interrupted):
            self.note("barge_in", turn=event.turn, heard_samples=event.heard_samples,
                      onset_sample=event.onset_sample, detect_sample=event.sample)
        elif isinstance(event, ev.HistoryCut):
            self.note("history_cut", turn=event.turn, heard_samples=event.heard_samples,
                      text=event.text, estimated=event.estimated)
        elif isinstance(event, ev.ReplyFinished):
            self.note("reply_finished", turn=event.turn, heard_samples=event.heard_samples)
        elif isinstance(event, ev.BargeInLapsed):
            self.note("barge_in_lapsed")
        elif isinstance(event, ev.DeviceTrouble):
            message = {"message": event.message} if event.message else {}
            self.note(event.kind, **message, **event.details)

    def note(self, kind: str, **fields: Any) -> None:
        """Log a session event of type `kind` (speech started, barge-in, latency, error...)."""
        if self.closed:
            return
        line = {"t": round(self._clock() - self._t0, 4), "type": kind, **fields}
        self._log.write(json.dumps(line, default=str) + "\n")
        self._log.flush()

    def flush(self) -> None:
        """Make both wav headers count everything written so far (the log is always flushed)."""
        self._mic.flush()
        self._assistant.flush()
        self._log.flush()

    def close(self) -> None:
        """Flush and close everything (idempotent)."""
        if self.closed:
            return
        self.note("session_closed")
        self.closed = True
        for handle in (self._mic, self._assistant, self._log):
            handle.close()
