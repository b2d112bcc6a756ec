"""Audio device discovery: choosing a device from a spec, and reporting a missing PortAudio."""

from __future__ import annotations

import pytest

from duplex_chat.audio import devices
from duplex_chat.audio.devices import DeviceInfo, find_device
from duplex_chat.config import DuplexError

from .virtual_audio import virtual_audio_or_skip


def _dev(index, name, n_in, n_out, default_in=False, default_out=False, hostapi="ALSA"):
    return DeviceInfo(index, name, hostapi, n_in, n_out, 48000.0, default_in, default_out)


DEVICES = [
    _dev(0, "HDA Intel PCH: ALC257 Analog", 2, 2),
    _dev(1, "USB Headset Mic", 1, 0, default_in=True),
    _dev(2, "USB Headset Speaker", 0, 2, default_out=True),
    _dev(3, "HDMI 0", 0, 8),
    _dev(4, "pulse", 32, 32),
    _dev(5, "pulse monitor", 32, 0),
]


@pytest.fixture
def fake_devices(monkeypatch):
    """Make list_devices() return DEVICES without touching PortAudio, and no sound server
    answer (whatever runs on this machine)."""
    monkeypatch.setattr(devices, "list_devices", lambda: list(DEVICES))
    fake_pulse(monkeypatch, None)
    return DEVICES


def fake_pulse(monkeypatch, found):
    """Make the sound server list `found` (None: no server answers)."""
    from duplex_chat.audio import pulse

    monkeypatch.setattr(pulse, "pulse_devices", lambda snapshot=None: found)
    monkeypatch.setattr(devices, "pulse_devices", lambda snapshot=None: found)


def _server_devices():
    from duplex_chat.audio.pulse import PulseDevice

    return [
        PulseDevice("input", 1, "alsa_input.usb-Blue_Yeti-00.analog-stereo", "Yeti Stereo Microphone",
                    48000, 2, is_default=True),
        PulseDevice("input", 2, "alsa_output.pci-0000_00_1f.3.analog-stereo.monitor",
                    "Monitor of Built-in Audio", 44100, 2,
                    monitor_of="alsa_output.pci-0000_00_1f.3.analog-stereo"),
        PulseDevice("output", 3, "alsa_output.pci-0000_00_1f.3.analog-stereo", "Built-in Audio",
                    44100, 2, is_default=True),
        PulseDevice("output", 4, "bluez_output.AA_BB.1", "WH-1000XM4", 48000, 2),
    ]


def test_a_sound_server_source_is_picked_by_name_or_description(fake_devices, monkeypatch):
    fake_pulse(monkeypatch, _server_devices())
    by_name = find_device("pulse:alsa_input.usb-Blue_Yeti-00.analog-stereo", "input")
    by_description = find_device("yeti", "input")  # no PortAudio device has it
    for found in (by_name, by_description):
        assert found.index == 4 and found.pulse_name == "alsa_input.usb-Blue_Yeti-00.analog-stereo"
        assert found.name == found.pulse_name and found.default_samplerate == 48000
    speaker = find_device("pulse:WH-1000XM4", "output")
    assert speaker.pulse_name == "bluez_output.AA_BB.1" and speaker.index == 4
    assert find_device("USB Headset Mic", "input").pulse_name == ""  # PortAudio's names first


def test_sound_server_names_that_fail_say_why(fake_devices, monkeypatch):
    fake_pulse(monkeypatch, _server_devices())
    with pytest.raises(DuplexError, match="matches several sinks"):
        find_device("pulse:_output", "output")
    with pytest.raises(DuplexError, match="no source named like 'webcam'"):
        find_device("pulse:webcam", "input")
    fake_pulse(monkeypatch, None)
    with pytest.raises(DuplexError, match="needs a PulseAudio or PipeWire server"):
        find_device("pulse:yeti", "input")
    fake_pulse(monkeypatch, _server_devices())
    without_route = [d for d in DEVICES if not d.name.startswith("pulse")]
    with pytest.raises(DuplexError, match="no 'pulse' device"):
        find_device("pulse:yeti", "input", without_route)


def test_empty_spec_picks_the_default_of_each_kind(fake_devices):
    assert find_device("", "input").index == 1
    assert find_device("  ", "output").index == 2


def test_integer_spec_is_an_index(fake_devices):
    assert find_device("0", "input").name.startswith("HDA")
    assert find_device("3", "output").name == "HDMI 0"


def test_name_part_is_case_insensitive(fake_devices):
    assert find_device("headset", "input").index == 1
    assert find_device("HEADSET", "output").index == 2
    assert find_device("alc257", "output").index == 0


def test_exact_name_wins_over_longer_matches(fake_devices):
    assert find_device("pulse", "input").index == 4


def test_ambiguous_name_lists_the_candidates(fake_devices):
    with pytest.raises(DuplexError) as err:
        find_device("pul", "input")
    message = str(err.value)
    assert "several input devices" in message
    assert "4: pulse" in message and "5: pulse monitor" in message
    assert "--input-device" in message


def test_missing_device_is_a_clear_error(fake_devices):
    with pytest.raises(DuplexError, match="No audio device name contains 'bluetooth'"):
        find_device("bluetooth", "output")
    with pytest.raises(DuplexError, match="no audio device with index 42"):
        find_device("42", "input")


def test_device_without_channels_of_that_kind(fake_devices):
    with pytest.raises(DuplexError, match="has no input channels"):
        find_device("HDMI", "input")
    with pytest.raises(DuplexError, match="has no output channels"):
        find_device("1", "output")


def test_no_default_device(monkeypatch):
    monkeypatch.setattr(devices, "list_devices", lambda: [_dev(0, "line in", 2, 0)])
    with pytest.raises(DuplexError, match="no default output device"):
        find_device("", "output")


def test_explicit_device_list_is_used(fake_devices):
    only = [_dev(7, "Studio Mic", 1, 0)]
    assert find_device("studio", "input", only).index == 7


def test_portaudio_missing_gives_the_install_command(monkeypatch):
    def broken_import():
        raise OSError("PortAudio library not found")

    monkeypatch.setattr(devices, "_import_sounddevice", broken_import)
    monkeypatch.setattr(devices, "portaudio_install_command",
                        lambda: "sudo apt-get install libportaudio2")
    ok, detail = devices.portaudio_status()
    assert not ok
    assert "sudo apt-get install libportaudio2" in detail
    with pytest.raises(DuplexError, match="libportaudio2"):
        devices.list_devices()
    assert not devices.supports_rate(DEVICES[0], "input", 16000)


def test_install_command_follows_os_release(monkeypatch, tmp_path):
    monkeypatch.setattr(devices.sys, "platform", "linux")
    monkeypatch.setattr(devices.os, "geteuid", lambda: 1000)  # a user: each step needs sudo
    cases = {'ID=ubuntu\nID_LIKE=debian\n':
             "sudo apt-get update && sudo apt-get install libportaudio2",
             'ID="fedora"\n': "sudo dnf install portaudio",
             'ID=endeavouros\nID_LIKE=arch\n': "sudo pacman -S portaudio"}
    for text, command in cases.items():
        (tmp_path / "os-release").write_text(text)
        monkeypatch.setattr(devices, "OS_RELEASE", tmp_path / "os-release")
        assert devices.portaudio_install_command() == command
    (tmp_path / "os-release").write_text('ID=unknown\n')
    assert devices.portaudio_install_command().startswith(
        "debian: sudo apt-get update && sudo apt-get install libportaudio2; fedora: sudo dnf")
    monkeypatch.setattr(devices.sys, "platform", "darwin")
    assert devices.portaudio_install_command() == "brew install portaudio"


def test_install_command_has_no_sudo_for_root(monkeypatch, tmp_path):
    # Root on a Debian image has no sudo, and needs none.
    monkeypatch.setattr(devices.sys, "platform", "linux")
    monkeypatch.setattr(devices.os, "geteuid", lambda: 0)
    (tmp_path / "os-release").write_text('ID=debian\n')
    monkeypatch.setattr(devices, "OS_RELEASE", tmp_path / "os-release")
    assert devices.portaudio_install_command() == "apt-get update && apt-get install libportaudio2"


def test_sounddevice_package_missing(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "sounddevice", None)  # makes `import sounddevice` fail
    ok, detail = devices.portaudio_status()
    assert not ok and "pip install sounddevice" in detail


@pytest.mark.audio_devices
def test_virtual_devices_are_listed_and_open_at_model_rates():
    with virtual_audio_or_skip() as va:
        listed = devices.list_devices()
        mic = find_device(va.app_input, "input", listed)
        speaker = find_device(va.app_output, "output", listed)
        assert mic.name == va.app_input and speaker.name == va.app_output
        assert devices.supports_rate(mic, "input", 16000)
        assert devices.supports_rate(speaker, "output", 24000)
        assert not devices.supports_rate(mic, "input", 123)


def _list_devices_cli() -> tuple[int, str]:
    from typer.testing import CliRunner

    from duplex_chat.cli.app import app

    result = CliRunner().invoke(app, ["talk", "--list-devices"], env={"COLUMNS": "120"})
    return result.exit_code, result.output


def test_list_devices_prints_a_table(fake_devices):
    code, output = _list_devices_cli()
    assert code == 0
    rows = {line.split("│")[2].strip(): line for line in output.splitlines() if "│" in line}
    assert set(rows) == {d.name for d in DEVICES}
    assert "input" in rows["USB Headset Mic"] and "output" in rows["USB Headset Speaker"]


def test_list_devices_shows_the_sound_servers_sources_and_sinks(fake_devices, monkeypatch):
    fake_pulse(monkeypatch, _server_devices())
    code, output = _list_devices_cli()
    assert code == 0 and "pulse:NAME" in output
    assert "Yeti Stereo Microphone" in output and "monitor of" in output and "WH-1000XM4" in output


def test_list_devices_without_any_says_what_to_do(monkeypatch):
    monkeypatch.setattr(devices, "list_devices", lambda: [])
    code, output = _list_devices_cli()
    assert code == 0
    assert "no audio devices" in output and "PulseAudio" in output
