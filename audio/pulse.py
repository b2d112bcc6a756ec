"""PulseAudio and PipeWire (through pipewire-pulse) sources and sinks, seen through `pactl`.

PortAudio 19.6 reaches a sound server only through ALSA's `pulse` plugin, so it lists just
`pulse` and `default`, never the real microphones and speakers. `pactl` (pulseaudio-utils; it
talks to PipeWire's pulse server too) lists them, and libpulse routes a stream opened on the
`pulse` device to the source or sink named in PULSE_SOURCE / PULSE_SINK (read when the stream's
connection is made). `pactl` also says which source and sink our own streams are on right now:
the server moves a stream when its device goes away, possibly onto the monitor of our own
speaker, without PortAudio noticing; `PulseWatch` notices.

Everything here degrades to "nothing known" (None, []) when there is no server or no pactl;
`pactl -f json` needs PulseAudio 16 or newer (or PipeWire's pactl).
"""

from __future__ import annotations

import json
import os
import queue
import select
import shutil
import subprocess
import threading
import time
from dataclasses import dataclass
from typing import Literal

Kind = Literal["input", "output"]
PACTL_TIMEOUT_S = 2.0  # a server that does not answer in this time is treated as absent
# PulseWatch looks where our streams are (one `pactl list`: ~4 ms of CPU in pactl, as much again
# in us) when the server says a source, sink or stream changed (`pactl subscribe`), once the
# burst of events has settled for SETTLE_S, and every RECHECK_S anyway. Where no subscription
# runs, it looks every WATCH_PERIOD_S instead (about 1 % of a core, the most of idle `talk`'s
# CPU that the device watch would otherwise take).
WATCH_PERIOD_S = 1.0
SETTLE_S = 0.2
RECHECK_S = 30.0
# `pactl subscribe` lines that concern where our streams are ("Event 'change' on sink #3");
# the many about clients (every pactl call is one) are not.
WATCHED_EVENTS = (b" on source-output ", b" on sink-input ", b" on source #", b" on sink #",
                  b" on server")
PREFIX = "pulse:"  # --input-device pulse:NAME names a source, --output-device pulse:NAME a sink
ENV = {"input": "PULSE_SOURCE", "output": "PULSE_SINK"}  # libpulse's per-client defaults
# Our streams carry this property (through libpulse's PULSE_PROP), valued with our process id, so
# the watch tells them from other streams of the same process (a test's own, say).
TAG = "duplex-chat.talk"


@dataclass(frozen=True)
class PulseDevice:
    """A source (`kind` "input") or sink ("output") of the sound server."""

    kind: Kind
    index: int  # the server's
    name: str  # what PULSE_SOURCE / PULSE_SINK take
    description: str
    rate: int
    channels: int
    is_default: bool = False
    monitor_of: str = ""  # for a sink's monitor source: that sink's name


@dataclass(frozen=True)
class StreamPlace:
    """Where one of our streams is: the device's name and rate, and whether that device is the
    monitor of a sink (then it hears that sink, not a microphone)."""

    device: str
    rate: int
    monitor_of: str = ""


def _pactl_json(*args: str) -> object | None:
    """`pactl -f json ARGS` parsed, or None (no pactl, no server, an old pactl)."""
    if shutil.which("pactl") is None:
        return None
    try:
        done = subprocess.run(["pactl", "-f", "json", *args], capture_output=True, text=True,
                              timeout=PACTL_TIMEOUT_S, check=False)
        return json.loads(done.stdout) if done.returncode == 0 else None
    except (OSError, subprocess.TimeoutExpired, ValueError):
        return None


def _rate(spec: str) -> int:
    """48000 from a sample specification like "s16le 2ch 48000Hz" (0 when unreadable)."""
    last = spec.split()[-1] if spec.split() else ""
    return int(last[:-2]) if last.endswith("Hz") and last[:-2].isdigit() else 0


def _channels(spec: str) -> int:
    part = next((p for p in spec.split() if p.endswith("ch")), "")
    return int(part[:-2]) if part[:-2].isdigit() else 0


def pulse_devices(snapshot: dict | None = None) -> list[PulseDevice] | None:
    """The server's sources and sinks, or None when no server answers through pactl.
    `snapshot`: a `pactl -f json list` already made (then the defaults are not marked)."""
    info = {} if snapshot is not None else _pactl_json("info")
    snapshot = _pactl_json("list") if snapshot is None else snapshot
    if not isinstance(info, dict) or not isinstance(snapshot, dict):
        return None
    sources, sinks = snapshot.get("sources", []), snapshot.get("sinks", [])
    monitors = {s.get("monitor_source", ""): s.get("name", "") for s in sinks}
    found = [_device("input", s, info.get("default_source_name"), monitors) for s in sources]
    found += [_device("output", s, info.get("default_sink_name"), {}) for s in sinks]
    return found


def _device(kind: Kind, entry: dict, default: object, monitors: dict[str, str]) -> PulseDevice:
    spec = str(entry.get("sample_specification", ""))
    name = str(entry.get("name", ""))
    return PulseDevice(kind, int(entry.get("index", -1)), name, str(entry.get("description", "")),
                       _rate(spec), _channels(spec), name == default, monitors.get(name, ""))


def find_pulse_device(spec: str, kind: Kind, devices: list[PulseDevice]) -> list[PulseDevice]:
    """The devices of `kind` that `spec` names: an exact name wins, else every one whose name
    or description contains it (case-insensitive)."""
    of_kind = [d for d in devices if d.kind == kind]
    exact = [d for d in of_kind if d.name == spec]
    if exact:
        return exact
    wanted = spec.lower()
    return [d for d in of_kind if wanted in d.name.lower() or wanted in d.description.lower()]


def our_streams(pid: int | None = None) -> dict[Kind, StreamPlace] | None:
    """Where this process's record and playback streams (those opened inside `routed`) are now,
    the newest of each, or None when the server cannot be asked."""
    pid = os.getpid() if pid is None else pid
    snapshot = _pactl_json("list")  # one call (~7 ms) for devices and streams alike
    devices = pulse_devices(snapshot) if isinstance(snapshot, dict) else None
    if devices is None or snapshot is None:
        return None
    outputs, inputs = snapshot.get("source_outputs", []), snapshot.get("sink_inputs", [])
    places: dict[Kind, StreamPlace] = {}
    for kind, streams, key in (("input", outputs, "source"), ("output", inputs, "sink")):
        by_index = {d.index: d for d in devices if d.kind == kind}
        mine = [s for s in streams if s.get("properties", {}).get(TAG) == str(pid)]
        if mine:
            newest = max(mine, key=lambda s: int(s.get("index", 0)))
            device = by_index.get(int(newest.get(key, -1)))
            places[kind] = (StreamPlace(device.name, device.rate, device.monitor_of) if device
                            else StreamPlace("?", 0))
    return places


def describe_change(kind: Kind, before: StreamPlace, now: StreamPlace) -> str:
    """One sentence for the user about a device swapped under our stream ("" when none)."""
    what = "microphone" if kind == "input" else "speaker"
    if now.device != before.device:
        return (f"The sound server moved the {what} from '{before.device}' to '{now.device}' "
                f"(was the device unplugged or the default changed?).")
    if now.rate != before.rate:
        return f"The {what} '{now.device}' now runs at {now.rate} Hz instead of {before.rate} Hz."
    return ""


class ServerEvents:
    """`pactl subscribe`: the sound server's word that a source, sink or stream changed."""

    def __init__(self, proc: subprocess.Popen):
        self._proc = proc
        self._fd = proc.stdout.fileno()
        self._partial = b""  # a line not yet whole

    @classmethod
    def open(cls) -> ServerEvents | None:
        """The subscription, or None where pactl cannot run it (no pactl, no server)."""
        if shutil.which("pactl") is None:
            return None
        try:
            proc = subprocess.Popen(["pactl", "subscribe"], stdout=subprocess.PIPE,
                                    stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
        except OSError:
            return None
        return cls(proc)

    def wait(self, timeout_s: float) -> bool | None:
        """Block until a watched change has been told and SETTLE_S passed without another
        (True), or `timeout_s` passed without one (False). None: the subscription ended (the
        server went away, or `close`)."""
        deadline, changed = time.monotonic() + timeout_s, False
        while (left := deadline - time.monotonic()) > 0:
            if not select.select([self._fd], [], [], left)[0]:
                break
            data = os.read(self._fd, 4096)
            if not data:
                return None
            *lines, self._partial = (self._partial + data).split(b"\n")
            if any(word in line for line in lines for word in WATCHED_EVENTS):
                changed, deadline = True, time.monotonic() + SETTLE_S
        return changed

    def stop(self) -> None:
        """End the subscription from any thread: pactl exits, and `wait` returns None."""
        if self._proc.poll() is None:
            self._proc.terminate()

    def close(self) -> None:
        """Stop, reap pactl and close the pipe (on the thread that waits)."""
        self.stop()
        try:
            self._proc.wait(PACTL_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()
        self._proc.stdout.close()


class PulseWatch:
    """Watches, on a thread of its own, where this process's streams are; `changes()` returns
    what changed since, as (kind, sentence, place). A microphone that turns out to be the
    monitor of our own speaker is reported too: the assistant would hear itself. Does nothing
    where the server cannot be asked."""

    def __init__(self, period_s: float = WATCH_PERIOD_S):
        self._period = period_s
        self._changes: queue.Queue[tuple[Kind, str, StreamPlace]] = queue.Queue()
        self._stop = threading.Event()
        self._events: ServerEvents | None = None
        self._thread = threading.Thread(target=self._run, name="pulse-watch", daemon=True)

    def start(self) -> PulseWatch:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        events = self._events
        if events is not None:
            events.stop()  # pactl exits now (no orphan at exit), which wakes the thread's wait

    def changes(self) -> list[tuple[Kind, str, StreamPlace]]:
        out = []
        while True:
            try:
                out.append(self._changes.get_nowait())
            except queue.Empty:
                return out

    def _run(self) -> None:
        self._events = ServerEvents.open()
        if self._stop.is_set() and self._events is not None:  # stopped while it opened
            self._events.stop()
        try:
            seen: dict[Kind, StreamPlace] | None = None
            while not self._wait(first=seen is None):
                seen = self._look(seen)
        finally:
            if self._events is not None:
                self._events.close()

    def _wait(self, first: bool) -> bool:
        """Until the next look; True when the watch is to stop. The first look waits a period
        (the streams are still connecting); later ones wait for the server's word."""
        if first or self._events is None:
            return self._stop.wait(self._period)
        if self._events.wait(RECHECK_S) is None:  # the subscription ended: poll from now on
            self._events.close()
            self._events = None
        return self._stop.is_set()

    def _look(self, seen: dict[Kind, StreamPlace] | None) -> dict[Kind, StreamPlace] | None:
        """Where our streams are now; queues what changed since `seen`. Returns the new view."""
        places = our_streams()
        if places is None:
            return seen
        if seen is None:
            self._check_loop(places)
            return places
        for kind, place in places.items():
            before = seen.get(kind)
            sentence = describe_change(kind, before, place) if before else ""
            if sentence:
                self._changes.put((kind, sentence, place))
        if places.get("input") != seen.get("input") or places.get("output") != seen.get("output"):
            self._check_loop(places)
        return {**seen, **places}

    def _check_loop(self, places: dict[Kind, StreamPlace]) -> None:
        """The microphone is the monitor of the sink we play into."""
        mic, speaker = places.get("input"), places.get("output")
        if mic and speaker and mic.monitor_of and mic.monitor_of == speaker.device:
            sentence = (f"The microphone is now '{mic.device}', which hears our own speaker "
                        f"'{speaker.device}', not you.")
            self._changes.put(("input", sentence, mic))


class routed:
    """Context manager: streams opened inside it on PortAudio's `pulse` device go to source
    `source` and sink `sink` ("" = the server's default), through libpulse's PULSE_SOURCE and
    PULSE_SINK, and carry TAG; the environment is put back afterwards."""

    def __init__(self, source: str = "", sink: str = ""):
        tag = f"{TAG}={os.getpid()}"
        user = os.environ.get("PULSE_PROP", "")
        self._wanted = {ENV["input"]: source, ENV["output"]: sink,
                        "PULSE_PROP": f"{user} {tag}".strip()}
        self._saved: dict[str, str | None] = {}

    def __enter__(self) -> None:
        for key, value in self._wanted.items():
            if value:
                self._saved[key] = os.environ.get(key)
                os.environ[key] = value

    def __exit__(self, *exc: object) -> None:
        for key, value in self._saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
