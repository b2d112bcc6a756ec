"""Settings: layer precedence, the legacy SCA_QWEN_* names, one-line errors, packaging."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest
from typer.testing import CliRunner

from duplex_chat.audio.constants import (
    FRAME_HZ,
    OUTPUT_SAMPLE_RATE,
    SAMPLE_RATE,
    frames_to_samples,
)
from duplex_chat.config import DuplexError, default_config_text, load_settings
from duplex_chat.config.settings import FIXED_AUDIO_KEYS

REPO = Path(__file__).resolve().parent.parent
SOURCE_ITEMS = ("pyproject.toml", "README.md", "audio", "config", "duplex_cli", "model", "session",
                "server")
REPO_DIR_NAMES = ("model", "audio", "config", "duplex_cli", "session", "server")  # must never be import names


def write_config(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def error_of(**kwargs) -> str:
    """The message of the DuplexError that load_settings(**kwargs) raises (environ={} default)."""
    kwargs.setdefault("environ", {})
    with pytest.raises(DuplexError) as info:
        load_settings(**kwargs)
    message = str(info.value)
    assert "\n" not in message, "errors must be one line"
    return message


# ------------------------------------------------------------------------------- precedence


def test_defaults_come_from_the_packaged_file():
    s = load_settings(environ={})
    packaged = tomllib.loads(default_config_text())
    assert s.as_dict() == packaged
    assert s.audio.frames_per_chunk == 4 and frames_to_samples(4) == 5120  # 320 ms at 16 kHz
    assert s.sources["qwen.torch_dtype"] == "default"


def test_precedence_flag_over_env_over_file_over_default(tmp_path):
    text = '[qwen]\ntorch_dtype = "float16"\nvoice = "Aiden"\nmax_reply_tokens = 9\n'
    config = write_config(tmp_path / "c.toml", text)
    environ = {"SCA_QWEN_TORCH_DTYPE": "float32", "SCA_QWEN_VOICE": "Chelsie"}
    s = load_settings(config, overrides={"qwen.torch_dtype": "auto"}, environ=environ)
    assert s.qwen.torch_dtype == "auto"  # flag beats env and file
    assert s.qwen.voice == "Chelsie"  # env beats file
    assert s.qwen.max_reply_tokens == 9  # file beats default
    assert s.qwen.device_map == "cuda"  # default
    assert s.sources["qwen.torch_dtype"] == "flag --torch-dtype"
    assert s.sources["qwen.voice"] == "environment SCA_QWEN_VOICE"
    assert s.sources["qwen.max_reply_tokens"] == f"config file {config}"
    # An override of None means "flag not given": the lower layer stays.
    s = load_settings(config, overrides={"qwen.voice": None}, environ=environ)
    assert s.qwen.voice == "Chelsie"


def test_cli_flags_map_to_keys_and_win(tmp_path, monkeypatch):
    """Through the real typer app: --config < env < flags, and flags are named as typed."""
    import duplex_chat.cli.replay as replay_module
    from duplex_chat.cli.app import app

    seen = {}

    def fake_run_replay(settings, file, out=None, stock=False, json_out=False, measured_latency=False):
        seen.update(settings=settings, file=file, stock=stock, json_out=json_out,
                    measured_latency=measured_latency)
        return 0

    monkeypatch.setattr(replay_module, "run_replay", fake_run_replay)
    config = write_config(tmp_path / "c.toml", '[qwen]\ndevice_map = "cuda:1"\nvoice = "Aiden"\n'
                          '[vad]\nend_of_turn_ms = 700\n')
    env = {"SCA_QWEN_DEVICE_MAP": "cpu", "SCA_QWEN_MODEL_ID": "/models/omni",
           "SCA_QWEN_TORCH_DTYPE": "fp8"}  # invalid, but the --dtype flag replaces it
    args = ["replay", "x.wav", "--config", str(config), "--dtype", "float32",
            "--voice", "chelsie", "--greedy", "--json", "--measured-latency"]
    result = CliRunner().invoke(app, args, env=env)
    assert result.exit_code == 0, result.output
    s = seen["settings"]
    assert (s.qwen.device_map, s.qwen.model_id, s.qwen.torch_dtype) == ("cpu", "/models/omni",
                                                                        "float32")
    assert s.qwen.voice == "Chelsie" and s.qwen.greedy is True and s.vad.end_of_turn_ms == 700
    assert s.sources["qwen.torch_dtype"] == "flag --dtype"
    assert seen["json_out"] is True and seen["file"] == Path("x.wav")
    assert seen["measured_latency"] is True


# --------------------------------------------------------------------------- legacy names


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32", "auto"])
def test_legacy_torch_dtype(dtype):
    assert load_settings(environ={"SCA_QWEN_TORCH_DTYPE": dtype}).qwen.torch_dtype == dtype


def test_legacy_model_device_and_8bit_names():
    environ = {"SCA_QWEN_MODEL_ID": "/data/my-finetune", "SCA_QWEN_DEVICE_MAP": "cuda:1",
               "SCA_QWEN_LOAD_IN_8BIT": "true"}
    q = load_settings(environ=environ).qwen
    assert (q.model_id, q.device_map, q.load_in_8bit) == ("/data/my-finetune", "cuda:1", True)
    for word, value in (("1", True), ("no", False), ("FALSE", False), ("On", True)):
        assert load_settings(environ={"SCA_QWEN_LOAD_IN_8BIT": word}).qwen.load_in_8bit is value


def test_other_tools_sca_variables_are_ignored():
    assert load_settings(environ={"SCA_OTHERTOOL_TOKEN": "x", "PATH": "/bin"}).qwen.voice == "Ethan"


def test_voice_is_case_insensitive():
    assert load_settings(environ={"SCA_QWEN_VOICE": "ethan"}).qwen.voice == "Ethan"
    assert load_settings(overrides={"qwen.voice": "CHELSIE"}, environ={}).qwen.voice == "Chelsie"


def test_numbers_from_strings():
    s = load_settings(environ={"SCA_VAD_END_OF_TURN_MS": "800", "SCA_QWEN_MAX_REPLY_SECONDS": "0.8",
                               "SCA_VAD_MIN_SPEECH_MS": "250.0"})
    assert (s.vad.end_of_turn_ms, s.qwen.max_reply_seconds, s.vad.min_speech_ms) == (800, 0.8, 250)


# -------------------------------------------------------------------------------- errors


def test_bad_dtype_names_key_value_origin_and_choices():
    message = error_of(environ={"SCA_QWEN_TORCH_DTYPE": "fp8"})
    for part in ("qwen.torch_dtype", "'fp8'", "environment SCA_QWEN_TORCH_DTYPE",
                 "float16, bfloat16, float32, auto"):
        assert part in message


def test_bad_bool():
    message = error_of(environ={"SCA_QWEN_LOAD_IN_8BIT": "maybe"})
    for part in ("qwen.load_in_8bit", "'maybe'", "SCA_QWEN_LOAD_IN_8BIT", "true or false"):
        assert part in message


def test_bad_type_in_file(tmp_path):
    config = write_config(tmp_path / "c.toml", "[vad]\nend_of_turn_ms = \"long\"\n")
    message = error_of(config_file=config)
    for part in ("vad.end_of_turn_ms", "'long'", f"config file {config}", "whole number"):
        assert part in message


def test_out_of_range_number_from_flag():
    message = error_of(overrides={"audio.frames_per_chunk": 99})
    for part in ("audio.frames_per_chunk", "99", "flag --frames-per-chunk", "between 1 and 50"):
        assert part in message
    message = error_of(environ={"SCA_VAD_THRESHOLD": "1.5"})
    assert "vad.threshold" in message and "between 0.0 and 1.0" in message


def test_unknown_key_in_file_lists_the_known_keys(tmp_path):
    config = write_config(tmp_path / "c.toml", "[qwen]\nmodel = \"x\"\n")
    message = error_of(config_file=config)
    for part in ("qwen.model", f"config file {config}", "model_id", "torch_dtype"):
        assert part in message


def test_unknown_env_key():
    message = error_of(environ={"SCA_QWEN_FOO": "1"})
    for part in ("qwen.foo", "environment SCA_QWEN_FOO", "model_id"):
        assert part in message


def test_unknown_section_in_file(tmp_path):
    config = write_config(tmp_path / "c.toml", "[model]\nid = \"x\"\n")
    message = error_of(config_file=config)
    for part in ("[model]", str(config), "audio, qwen, vad, ui"):
        assert part in message


def test_plain_value_instead_of_section(tmp_path):
    config = write_config(tmp_path / "c.toml", "model_id = \"x\"\n")
    assert "model_id" in error_of(config_file=config)


def test_invalid_toml(tmp_path):
    config = write_config(tmp_path / "c.toml", "[qwen\nvoice = Ethan\n")
    message = error_of(config_file=config)
    assert str(config) in message and "not valid TOML" in message


def test_missing_config_file(tmp_path):
    message = error_of(config_file=tmp_path / "nope.toml")
    assert "nope.toml" in message and "does not exist" in message


def test_relation_8bit_needs_cuda():
    message = error_of(environ={"SCA_QWEN_LOAD_IN_8BIT": "1", "SCA_QWEN_DEVICE_MAP": "cpu"})
    assert "load_in_8bit" in message and "SCA_QWEN_DEVICE_MAP" in message


# ------------------------------------------------------------------------------ packaging


@pytest.fixture(scope="module")
def built_wheel(tmp_path_factory) -> Path:
    """A wheel of a copy of the sources (the shared working tree gets no build/ or egg-info)."""
    root = tmp_path_factory.mktemp("wheel")
    src = root / "src"
    src.mkdir()
    for name in SOURCE_ITEMS:
        item = REPO / name
        if item.is_dir():
            shutil.copytree(item, src / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(item, src / name)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                    "--no-index", "-q", "-w", str(root / "dist"), str(src)],
                   check=True, capture_output=True, timeout=120)
    (wheel,) = (root / "dist").glob("duplex_chat-*.whl")
    return wheel


def test_wheel_holds_data_files_under_one_namespace(built_wheel):
    names = zipfile.ZipFile(built_wheel).namelist()
    assert "duplex_chat/config/default.toml" in names
    assert "duplex_chat/model/release_config.json" in names
    assert "duplex_chat/server/page.html" in names
    assert "duplex_chat/session/data/smart-turn-v3.2-cpu.onnx" in names
    assert "duplex_chat/session/data/smart-turn-LICENSE.txt" in names
    top = {n.split("/", 1)[0] for n in names}
    assert {t for t in top if not t.endswith(".dist-info")} == {"duplex_chat"}
    assert not top & set(REPO_DIR_NAMES)
    top_level = next(n for n in names if n.endswith(".dist-info/top_level.txt"))
    assert zipfile.ZipFile(built_wheel).read(top_level).decode().split() == ["duplex_chat"]


def test_wheel_reads_default_toml_through_importlib_resources(built_wheel, tmp_path):
    """Unpacked as pip would install it, in a Python without site-packages (so neither the
    editable install nor the repository can be picked up)."""
    with zipfile.ZipFile(built_wheel) as z:
        z.extractall(tmp_path / "site")
    probe = (
        "import sys, importlib.util; sys.path.insert(0, sys.argv[1])\n"
        "import duplex_chat.config as c\n"
        "assert c.__file__.startswith(sys.argv[1]), c.__file__\n"
        "from importlib import resources\n"
        "resources.files('duplex_chat.model').joinpath('release_config.json').read_text()\n"
        "print(c.load_settings(environ={}).qwen.model_id)\n"
        "print([importlib.util.find_spec(n) for n in ('model', 'audio', 'config')])\n"
    )
    result = subprocess.run([sys.executable, "-I", "-S", "-c", probe, str(tmp_path / "site")],
                            capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split("\n")[:2] == ["Qwen/Qwen3-Omni-30B-A3B-Instruct",
                                             "[None, None, None]"]


def test_the_web_versions_fixed_audio_keys_are_accepted_with_their_one_value(tmp_path):
    """Old config files and SCA_AUDIO_* variables may still name the rates and sizes the model
    fixes: with the one allowed value they change nothing, with another they stop the command
    with one sentence. The allowed values are the ones audio/constants.py holds."""
    assert FIXED_AUDIO_KEYS == {"sample_rate": SAMPLE_RATE, "output_sample_rate": OUTPUT_SAMPLE_RATE,
                                "frame_hz": FRAME_HZ, "channels": 1, "sample_width_bytes": 2}
    old = tmp_path / "web.toml"
    old.write_text("[audio]\nsample_rate = 16000\noutput_sample_rate = 24000\nframe_hz = 12.5\n"
                   "frames_per_chunk = 2\nchannels = 1\nsample_width_bytes = 2\n")
    settings = load_settings(config_file=old, environ={"SCA_AUDIO_SAMPLE_RATE": "16000"})
    assert settings.audio.frames_per_chunk == 2
    assert not hasattr(settings.audio, "sample_rate")
    message = error_of(environ={"SCA_AUDIO_SAMPLE_RATE": "48000"})
    assert "audio.sample_rate" in message and "fixes it at 16000" in message
    old.write_text("[audio]\nchannels = 2\n")
    assert "audio.channels = 2" in error_of(config_file=old)
