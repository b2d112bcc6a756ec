"""Audio device discovery through PortAudio (the `sounddevice` package).

`sounddevice` is imported lazily, only by the functions here: on Linux its wheel carries no
PortAudio, so `import sounddevice` raises OSError when libportaudio2 is missing, and the rest of
duplex-chat (replay, check) must still work then. `portaudio_status()` says whether it imports and,
when not, the exact command that installs PortAudio on this system.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Literal, Sequence

from duplex_chat.config import DuplexError

from .pulse import PREFIX as PULSE_PREFIX
from .pulse import PulseDevice, find_pulse_device, pulse_devices

Kind = Literal["input", "output"]
KINDS: tuple[str, ...] = ("input", "output")
CHECK_CHANNELS = 1  # duplex-chat records and plays mono
OS_RELEASE = Path("/etc/os-release")

# Install commands per OS family (matched against /etc/os-release ID and ID_LIKE). The steps of
# the families in NEEDS_ROOT run as root: `portaudio_install_command` puts "sudo " before each one
# unless duplex-chat already runs as root (Debian's container images have no sudo at all).
INSTALL_COMMANDS: dict[str, str] = {
    "debian": "apt-get update && apt-get install libportaudio2",  # a fresh system has no lists yet
    "fedora": "dnf install portaudio",
    "arch": "pacman -S portaudio",
    "suse": "zypper install libportaudio2",
    "macos": "brew install portaudio",
}
NEEDS_ROOT = {"debian", "fedora", "arch", "suse"}
# PortAudio devices (ALSA PCMs) that reach the sound server, the first one present is used
PULSE_ROUTES = ("pulse", "default")
FAMILY_ALIASES = {"ubuntu": "debian", "rhel": "fedora", "centos": "fedora", "manjaro": "arch",
                  "opensuse": "suse", "opensuse-leap": "suse", "opensuse-tumbleweed": "suse"}


@dataclass(frozen=True)
class DeviceInfo:
    """One PortAudio device as duplex-chat sees it. `index` is what sounddevice's `device=` takes."""

    index: int
    name: str
    hostapi: str
    max_input_channels: int
    max_output_channels: int
    default_samplerate: float
    is_default_input: bool
    is_default_output: bool
    # A sound-server source or sink reached through PortAudio's `pulse` device (audio/pulse.py):
    # its name, for PULSE_SOURCE / PULSE_SINK; "" for a plain PortAudio device.
    pulse_name: str = ""

    def channels(self, kind: Kind) -> int:
        """Maximum channels of `kind` ("input" or "output")."""
        return self.max_input_channels if kind == "input" else self.max_output_channels


def _import_sounddevice() -> ModuleType:
    """Import sounddevice; raises OSError (no PortAudio library) or ImportError (not installed)."""
    import sounddevice

    return sounddevice


def portaudio_install_command() -> str:
    """The command that installs PortAudio here; all known ones when the system is not recognised."""
    if sys.platform == "darwin":
        return INSTALL_COMMANDS["macos"]
    try:
        text = OS_RELEASE.read_text(encoding="utf-8")
    except OSError:
        text = ""
    ids: list[str] = []
    for line in text.splitlines():
        key, _, value = line.partition("=")
        if key in ("ID", "ID_LIKE"):
            ids += value.strip().strip('"').lower().split()
    for os_id in ids:
        family = FAMILY_ALIASES.get(os_id, os_id)
        if family in INSTALL_COMMANDS:
            return _install_command(family)
    return "; ".join(f"{name}: {_install_command(name)}" for name in INSTALL_COMMANDS)


def _install_command(family: str) -> str:
    """INSTALL_COMMANDS[family], with "sudo " before each step that needs root, unless we are root."""
    command = INSTALL_COMMANDS[family]
    if family not in NEEDS_ROOT or os.geteuid() == 0:
        return command
    return " && ".join(f"sudo {step}" for step in command.split(" && "))


def portaudio_status() -> tuple[bool, str]:
    """(ok, detail): whether `import sounddevice` works; when not, detail has the install command."""
    try:
        sd = _import_sounddevice()
    except OSError as exc:
        return False, (f"PortAudio library not found ({exc}); install it with: "
                       f"{portaudio_install_command()}")
    except ImportError as exc:
        return False, f"The sounddevice package is missing ({exc}); install it with: pip install sounddevice"
    version = sd.get_portaudio_version()[1].split(",")[0]  # drop the long revision hash
    return True, f"{version} (sounddevice {sd.__version__})"


def _sounddevice() -> ModuleType:
    ok, detail = portaudio_status()
    if not ok:
        raise DuplexError("Audio devices are unavailable.", hint=detail)
    return _import_sounddevice()


def _default_index(sd: ModuleType, kind: Kind) -> int:
    """PortAudio's default device of `kind` (honouring sd.default.device), or -1 when none."""
    try:
        return int(sd.query_devices(kind=kind)["index"])
    except Exception:  # sounddevice raises PortAudioError or ValueError when there is no default
        return -1


def list_devices() -> list[DeviceInfo]:
    """All PortAudio devices, in index order. Raises DuplexError when PortAudio is missing."""
    sd = _sounddevice()
    hostapis = [api["name"] for api in sd.query_hostapis()]
    default_in, default_out = _default_index(sd, "input"), _default_index(sd, "output")
    return [
        DeviceInfo(
            index=int(dev["index"]),
            name=str(dev["name"]),
            hostapi=hostapis[dev["hostapi"]] if 0 <= dev["hostapi"] < len(hostapis) else "?",
            max_input_channels=int(dev["max_input_channels"]),
            max_output_channels=int(dev["max_output_channels"]),
            default_samplerate=float(dev["default_samplerate"]),
            is_default_input=int(dev["index"]) == default_in,
            is_default_output=int(dev["index"]) == default_out,
        )
        for dev in sd.query_devices()
    ]


def default_device(kind: Kind, devices: Sequence[DeviceInfo] | None = None) -> DeviceInfo | None:
    """The system default device of `kind`, or None when there is none."""
    devices = list_devices() if devices is None else devices
    flag = "is_default_input" if kind == "input" else "is_default_output"
    return next((d for d in devices if getattr(d, flag)), None)


def find_device(spec: str, kind: Kind, devices: Sequence[DeviceInfo] | None = None) -> DeviceInfo:
    """The device `spec` names for `kind` ("input" or "output").

    `spec`: "" = the system default; an integer string = that index; "pulse:NAME" = the sound
    server's source or sink NAME (audio/pulse.py); anything else = a case-insensitive part of
    the name (a unique exact name wins over partial matches), or, when no PortAudio device has
    it, of a sound-server source's or sink's name or description. `devices`
    defaults to `list_devices()`. Raises DuplexError when the device is missing, ambiguous, or
    has no channels of `kind`.
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be 'input' or 'output', not {kind!r}")
    devices = list_devices() if devices is None else list(devices)
    spec = spec.strip()
    flag = f"--{kind}-device"
    if spec.lower().startswith(PULSE_PREFIX):
        return _pulse_route(spec[len(PULSE_PREFIX):], kind, devices, flag)
    if not spec:
        found = default_device(kind, devices)
        if found is None:
            raise DuplexError(f"There is no default {kind} device.",
                              hint=f"Pick one with {flag} (see `duplex-chat talk --list-devices`).")
        return _with_channels(found, kind, flag)
    if spec.lstrip("-").isdigit():
        found = next((d for d in devices if d.index == int(spec)), None)
        if found is None:
            raise DuplexError(f"There is no audio device with index {spec}.",
                              hint="See `duplex-chat talk --list-devices`.")
        return _with_channels(found, kind, flag)
    return _by_name(spec, kind, devices, flag)


def _by_name(spec: str, kind: Kind, devices: Sequence[DeviceInfo], flag: str) -> DeviceInfo:
    wanted = spec.lower()
    named = [d for d in devices if wanted in d.name.lower()]
    if not named:
        pulse = pulse_devices()  # a desktop's real microphones and speakers are the server's
        if pulse and find_pulse_device(spec, kind, pulse):
            return _pulse_route(spec, kind, devices, flag, pulse)
        raise DuplexError(f"No audio device name contains '{spec}'.",
                          hint="See `duplex-chat talk --list-devices`.")
    usable = [d for d in named if d.channels(kind) > 0]
    if not usable:
        raise DuplexError(f"Audio device '{named[0].name}' has no {kind} channels.",
                          hint=f"Pick an {kind} device with {flag}.")
    exact = [d for d in usable if d.name.lower() == wanted]
    if len(exact) == 1:
        return exact[0]
    if len(usable) > 1:
        listed = "; ".join(f"{d.index}: {d.name} ({d.hostapi})" for d in usable)
        raise DuplexError(f"'{spec}' matches several {kind} devices: {listed}.",
                          hint=f"Give {flag} a longer name part or an index.")
    return usable[0]


def _pulse_route(spec: str, kind: Kind, devices: Sequence[DeviceInfo], flag: str,
                 pulse: list[PulseDevice] | None = None) -> DeviceInfo:
    """The sound server's source or sink `spec` names, as PortAudio's `pulse` device (or
    `default`, which goes to the server on such desktops) routed there (DeviceInfo.pulse_name)."""
    pulse = pulse_devices() if pulse is None else pulse
    if pulse is None:
        raise DuplexError(f"'{PULSE_PREFIX}{spec}' needs a PulseAudio or PipeWire server and "
                          "pactl, and none answers.",
                          hint="Install pulseaudio-utils, or pick a device by index or name.")
    matches = find_pulse_device(spec, kind, pulse)
    what = "source" if kind == "input" else "sink"
    if not matches:
        raise DuplexError(f"The sound server has no {what} named like '{spec}'.",
                          hint="See `duplex-chat talk --list-devices`.")
    if len(matches) > 1:
        listed = "; ".join(f"{d.name} ({d.description})" for d in matches)
        raise DuplexError(f"'{spec}' matches several {what}s: {listed}.",
                          hint=f"Give {flag} the whole name, as {PULSE_PREFIX}NAME.")
    route = next((d for name in PULSE_ROUTES for d in devices
                  if d.name == name and d.channels(kind) > 0), None)
    if route is None:
        raise DuplexError("PortAudio has no 'pulse' device to reach the sound server through.",
                          hint="Install ALSA's pulse plugin (libasound2-plugins on Debian and "
                               "Ubuntu; pipewire-alsa with PipeWire).")
    found = matches[0]
    return dataclasses.replace(route, name=found.name, hostapi=f"{route.hostapi} -> {route.name}",
                               default_samplerate=float(found.rate or route.default_samplerate),
                               pulse_name=found.name)


def _with_channels(device: DeviceInfo, kind: Kind, flag: str) -> DeviceInfo:
    if device.channels(kind) < CHECK_CHANNELS:
        raise DuplexError(f"Audio device {device.index} ({device.name}) has no {kind} channels.",
                          hint=f"Pick an {kind} device with {flag}.")
    return device


def supports_rate(device: DeviceInfo, kind: Kind, rate: int, channels: int = CHECK_CHANNELS) -> bool:
    """Whether `device` opens for `kind` at `rate` Hz with `channels` channels (PortAudio's check).

    False when it does not (the caller then resamples) or when PortAudio is missing.
    """
    try:
        sd = _import_sounddevice()
        check = sd.check_input_settings if kind == "input" else sd.check_output_settings
        check(device=device.index, samplerate=rate, channels=channels)
    except Exception:  # PortAudioError, ValueError, OSError: all mean "cannot open like that"
        return False
    return True
