"""Real audio devices without a sound card: a private PulseAudio daemon with null sinks.

Layout (see shared notes "virtual-audio"): the test plays speech into sink `mic_feed` and the app
records its monitor through the remapped source `virtmic`; the app plays into sink `virtspk` and the
test records `virtspk.monitor`. ALSA names each as a PCM (`virtmic`, `virtspk`, `mic_feed`,
`virtspk_mon`) so PortAudio can open them; the generic `pulse` device is too slow to use.

`virtual_audio()` is a context manager; `virtual_audio_or_skip()` turns "no pulseaudio here" into
a pytest skip with the reason. ALSA reads its config when PortAudio initialises, so we point
`ALSA_CONFIG_PATH` at our file and re-initialise sounddevice if it was already imported.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

MIC_RATE = 16_000  # Hz of the virtual microphone sink
SPK_RATE = 24_000  # Hz of the virtual speaker sink
START_TIMEOUT_S = 10.0
ALSA_BASE_CONFIG = "/usr/share/alsa/alsa.conf"

ALSA_PCMS = """
pcm.virtmic { type pulse; device "virtmic" }
pcm.virtspk { type pulse; device "virtspk" }
pcm.mic_feed { type pulse; device "mic_feed" }
pcm.virtspk_mon { type pulse; device "virtspk.monitor" }
"""

MODULES = (
    f"module-null-sink sink_name=mic_feed rate={MIC_RATE} channels=1 norewinds=1",
    "module-remap-source source_name=virtmic master=mic_feed.monitor",
    f"module-null-sink sink_name=virtspk rate={SPK_RATE} channels=1 norewinds=1",
)


@dataclass(frozen=True)
class VirtualAudio:
    """Names of the virtual devices as PortAudio lists them (ALSA PCM names)."""

    app_input: str = "virtmic"  # what `talk` records (the test's speech arrives here)
    app_output: str = "virtspk"  # what `talk` plays into
    test_output: str = "mic_feed"  # where the test plays "the user's voice"
    test_input: str = "virtspk_mon"  # where the test hears "the speaker"
    runtime_dir: str = ""


def unavailable_reason() -> str | None:
    """Why virtual audio cannot run here, or None when it can."""
    for tool in ("pulseaudio", "pactl"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (apt-get install pulseaudio pulseaudio-utils)"
    if not Path(ALSA_BASE_CONFIG).exists():
        return f"{ALSA_BASE_CONFIG} is missing (no ALSA)"
    try:
        import sounddevice  # noqa: F401
    except (OSError, ImportError) as exc:
        return f"sounddevice/PortAudio unavailable: {exc}"
    return None


def _pactl(env: dict, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["pactl", *args], env=env, capture_output=True, text=True, timeout=10)


def _start_daemon(env: dict) -> None:
    subprocess.run(
        ["pulseaudio", "-D", "-n", "--exit-idle-time=-1", "--system=false",
         "--load=module-native-protocol-unix"],
        env=env, capture_output=True, timeout=20, check=False,
    )
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if _pactl(env, "info").returncode == 0:
            return
        time.sleep(0.05)
    raise RuntimeError("pulseaudio did not start")


def _reinit_portaudio() -> None:
    """Make PortAudio (and so ALSA) read the environment we just set."""
    if "sounddevice" in sys.modules:
        sd = sys.modules["sounddevice"]
        sd._terminate()
        sd._initialize()


@contextlib.contextmanager
def virtual_audio() -> Iterator[VirtualAudio]:
    """Start a private PulseAudio with the virtual devices; stop it and restore the env after."""
    runtime = tempfile.mkdtemp(prefix="duplex-pulse-")
    os.chmod(runtime, 0o700)
    alsa_conf = Path(runtime) / "asound.conf"
    alsa_conf.write_text(ALSA_PCMS, encoding="utf-8")
    saved = {k: os.environ.get(k) for k in ("XDG_RUNTIME_DIR", "ALSA_CONFIG_PATH", "PULSE_SERVER")}
    env = dict(os.environ, XDG_RUNTIME_DIR=runtime)
    env.pop("PULSE_SERVER", None)
    try:
        _start_daemon(env)
        for module in MODULES:
            result = _pactl(env, "load-module", *module.split())
            if result.returncode != 0:
                raise RuntimeError(f"pactl load-module {module} failed: {result.stderr.strip()}")
        os.environ["XDG_RUNTIME_DIR"] = runtime
        os.environ["ALSA_CONFIG_PATH"] = f"{ALSA_BASE_CONFIG}:{alsa_conf}"
        os.environ.pop("PULSE_SERVER", None)
        _reinit_portaudio()
        yield VirtualAudio(runtime_dir=runtime)
    finally:
        subprocess.run(["pulseaudio", "--kill"], env=env, capture_output=True, timeout=10)
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        _reinit_portaudio()
        shutil.rmtree(runtime, ignore_errors=True)


@contextlib.contextmanager
def virtual_audio_or_skip() -> Iterator[VirtualAudio]:
    """`virtual_audio()`, or a pytest skip that says why it cannot run here."""
    import pytest

    reason = unavailable_reason()
    if reason:
        pytest.skip(f"virtual audio unavailable: {reason}")
    with contextlib.ExitStack() as stack:
        try:
            devices = stack.enter_context(virtual_audio())
        except RuntimeError as exc:  # pulseaudio is installed but would not start
            pytest.skip(f"virtual audio unavailable: {exc}")
        yield devices
