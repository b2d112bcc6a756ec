"""Settings: one frozen dataclass tree, loaded from TOML, environment and flags, validated once.

Precedence, highest first: command-line flag > environment (SCA_<SECTION>_<KEY>) > `--config FILE`
> the packaged `default.toml`. The packaged file is the only place defaults are written down; the
dataclasses below declare the keys, their types and what values are allowed.
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
from dataclasses import dataclass, field, fields
from importlib import resources
from pathlib import Path
from typing import Any, Mapping

from .errors import DuplexError

ENV_PREFIX = "SCA_"
DTYPES = ("float16", "bfloat16", "float32", "auto")
VOICES = ("Ethan", "Chelsie", "Aiden")
QUANTIZE_MODES = ("none", "int8", "int4", "fp8")  # weights quantized while loading
TURN_POLICIES = ("silence", "smart")  # what ends a user turn (session/policy.py)


def _choices(*allowed: str) -> dict:
    return {"choices": allowed}


def _range(lo: float | None = None, hi: float | None = None) -> dict:
    return {"range": (lo, hi)}


# Keys of the earlier web version's [audio] section whose values the model fixes (the rates and
# sizes `duplex_chat.audio.constants` holds; tests/test_config.py checks that they agree). Its
# users' config files and SCA_AUDIO_* variables may still set them: the one value the model
# allows is accepted and changes nothing, any other is refused. They are not settings.
FIXED_AUDIO_KEYS = {"sample_rate": 16000, "output_sample_rate": 24000, "frame_hz": 12.5,
                    "channels": 1, "sample_width_bytes": 2}


@dataclass(frozen=True)
class AudioSettings:
    frames_per_chunk: int = field(metadata=_range(1, 50))
    input_device: str = field(metadata={})
    output_device: str = field(metadata={})
    echo_cancellation: bool = field(metadata={})
    barge_in: bool = field(metadata={})
    stream_latency_ms: float = field(metadata=_range(5.0, 500.0))


@dataclass(frozen=True)
class QwenSettings:
    model_id: str = field(metadata={"nonempty": True})
    device_map: str = field(metadata={"nonempty": True})
    torch_dtype: str = field(metadata=_choices(*DTYPES))
    load_in_8bit: bool = field(metadata={})
    quantize: str = field(metadata=_choices(*QUANTIZE_MODES))
    voice: str = field(metadata=_choices(*VOICES))
    system_prompt: str = field(metadata={})
    decoder: str = field(metadata=_choices("auto", "fast", "eager"))
    encoder_window_s: float = field(metadata=_choices(1.0, 2.0))  # type: ignore[arg-type]
    first_packet_frames: int = field(metadata=_range(1, 2))
    packet_frames: int = field(metadata=_range(1, 25))
    max_reply_tokens: int = field(metadata=_range(1, 8192))
    max_context_tokens: int = field(metadata=_range(2048, 65536))
    max_reply_seconds: float = field(metadata=_range(0.08, 600.0))
    greedy: bool = field(metadata={})
    thinker_temperature: float = field(metadata=_range(0.0, 5.0))
    thinker_top_p: float = field(metadata=_range(0.0, 1.0))
    thinker_top_k: int = field(metadata=_range(0, 1_000_000))
    talker_temperature: float = field(metadata=_range(0.0, 5.0))
    talker_top_p: float = field(metadata=_range(0.0, 1.0))
    talker_top_k: int = field(metadata=_range(0, 1_000_000))
    talker_repetition_penalty: float = field(metadata=_range(1.0, 5.0))


@dataclass(frozen=True)
class VadSettings:
    threshold: float = field(metadata=_range(0.0, 1.0))
    neg_threshold: float = field(metadata=_range(0.0, 1.0))
    min_speech_ms: int = field(metadata=_range(0, 10_000))
    end_of_turn_ms: int = field(metadata=_range(32, 10_000))
    pre_roll_ms: int = field(metadata=_range(0, 5_000))


@dataclass(frozen=True)
class TurnSettings:
    policy: str = field(metadata=_choices(*TURN_POLICIES))
    pause_ms: int = field(metadata=_range(32, 5_000))
    fallback_ms: int = field(metadata=_range(100, 10_000))
    threshold: float = field(metadata=_range(0.0, 1.0))
    speculate_ms: int = field(metadata=_range(0, 10_000))


@dataclass(frozen=True)
class UiSettings:
    refresh_hz: float = field(metadata=_range(0.5, 60.0))
    plain: bool = field(metadata={})
    record_dir: str = field(metadata={})


@dataclass(frozen=True)
class ServeSettings:
    host: str = field(metadata={"nonempty": True})
    port: int = field(metadata=_range(1, 65535))
    token: str = field(metadata={})
    cert: str = field(metadata={})
    key: str = field(metadata={})
    allowed_origins: str = field(metadata={})
    idle_timeout_s: float = field(metadata=_range(0.1, 86_400.0))
    max_frame_bytes: int = field(metadata=_range(1024, 16_000_000))
    max_audio_rate: float = field(metadata=_range(1.0, 100.0))
    max_messages_per_s: float = field(metadata=_range(1.0, 10_000.0))


@dataclass(frozen=True)
class Settings:
    """The whole configuration. `sources` maps "section.key" to where its value came from."""

    audio: AudioSettings
    qwen: QwenSettings
    vad: VadSettings
    ui: UiSettings
    serve: ServeSettings
    turn: TurnSettings
    sources: Mapping[str, str] = field(default_factory=dict, compare=False)

    def as_dict(self) -> dict[str, dict[str, Any]]:
        return {name: dataclasses.asdict(getattr(self, name)) for name in SECTIONS}

    def replace(self, section: str, **values: Any) -> "Settings":
        """A copy with some keys of one section changed (values must already be valid)."""
        updated = dataclasses.replace(getattr(self, section), **values)
        return dataclasses.replace(self, **{section: updated})


SECTIONS: dict[str, type] = {
    "audio": AudioSettings,
    "qwen": QwenSettings,
    "vad": VadSettings,
    "ui": UiSettings,
    "serve": ServeSettings,
    "turn": TurnSettings,
}


def default_config_text() -> str:
    return (resources.files("duplex_chat.config") / "default.toml").read_text(encoding="utf-8")


def load_settings(
    config_file: str | Path | None = None,
    overrides: Mapping[str, Any] | None = None,
    environ: Mapping[str, str] | None = None,
    flag_names: Mapping[str, str] | None = None,
) -> Settings:
    """Build the settings from all layers.

    `overrides` maps "section.key" to a value given on the command line (already typed or as a
    string); `flag_names` maps the same keys to the flag the user typed, for messages;
    `environ` defaults to `os.environ`.
    """
    raw: dict[str, tuple[Any, str]] = {}
    defaults = tomllib.loads(default_config_text())
    _merge(raw, defaults, "default", strict=True)
    if config_file is not None:
        _merge(raw, _read_toml(Path(config_file)), f"config file {config_file}", strict=True)
    _merge_env(raw, os.environ if environ is None else environ)
    for dotted, value in (overrides or {}).items():
        if value is None or _fixed_key(dotted, value, "command line"):
            continue
        _check_key(dotted, "command line")
        flag = (flag_names or {}).get(dotted) or _flag_name(dotted)
        raw[dotted] = (value, f"flag {flag}")
    return _build(raw)


def _flag_name(dotted: str) -> str:
    return "--" + dotted.split(".", 1)[1].replace("_", "-")


def _read_toml(path: Path) -> dict:
    if not path.is_file():
        raise DuplexError(f"Config file {path} does not exist.")
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise DuplexError(f"Config file {path} is not valid TOML: {exc}.") from None


def _fixed_key(dotted: str, value: Any, origin: str) -> bool:
    """True for a key of `FIXED_AUDIO_KEYS` holding its one value (to be skipped); raises for
    one holding another value; False for every other key."""
    section, _, key = dotted.partition(".")
    if section != "audio" or key not in FIXED_AUDIO_KEYS:
        return False
    fixed = FIXED_AUDIO_KEYS[key]
    if _coerce(value, type(fixed)) != fixed:
        raise DuplexError(f"Config key {dotted} = {value!r} (from {origin}) cannot be changed: "
                          f"the model fixes it at {fixed}.")
    return True


def _check_key(dotted: str, origin: str, value: Any = None) -> None:
    section, _, key = dotted.partition(".")
    if section not in SECTIONS:
        raise DuplexError(
            f"Unknown config section [{section}] in {origin}; sections are "
            f"{', '.join(SECTIONS)}."
        )
    names = [f.name for f in fields(SECTIONS[section])]
    if key not in names:
        shown = "" if value is None else f" = {value!r}"
        raise DuplexError(
            f"Unknown config key {dotted}{shown} in {origin}; [{section}] has keys "
            f"{', '.join(names)}."
        )


def _merge(raw: dict, table: dict, origin: str, strict: bool) -> None:
    for section, values in table.items():
        if not isinstance(values, dict):
            raise DuplexError(f"{origin}: '{section}' must be a [section], not a plain value.")
        for key, value in values.items():
            dotted = f"{section}.{key}"
            if _fixed_key(dotted, value, origin):
                continue
            if strict:
                _check_key(dotted, origin, value)
            raw[dotted] = (value, origin)


def _merge_env(raw: dict, environ: Mapping[str, str]) -> None:
    for name, value in environ.items():
        if not name.startswith(ENV_PREFIX):
            continue
        section, _, key = name[len(ENV_PREFIX):].lower().partition("_")
        if section not in SECTIONS:
            continue  # SCA_ variables of other tools are not ours to judge
        dotted = f"{section}.{key}"
        if _fixed_key(dotted, value, f"environment {name}"):
            continue
        _check_key(dotted, f"environment {name}", value)
        raw[dotted] = (value, f"environment {name}")


def _build(raw: dict[str, tuple[Any, str]]) -> Settings:
    sections = {}
    for section, cls in SECTIONS.items():
        kwargs = {}
        for f in fields(cls):
            dotted = f"{section}.{f.name}"
            if dotted not in raw:
                raise DuplexError(f"Config key {dotted} is missing from every config layer.")
            value, origin = raw[dotted]
            kwargs[f.name] = _validate(dotted, value, origin, f)
        sections[section] = cls(**kwargs)
    settings = Settings(**sections, sources={k: o for k, (_, o) in raw.items()})
    _check_relations(settings)
    return settings


def _validate(dotted: str, value: Any, origin: str, f: dataclasses.Field) -> Any:
    kind = f.type if isinstance(f.type, type) else {"int": int, "float": float, "bool": bool,
                                                   "str": str}[str(f.type)]
    typed = _coerce(value, kind)
    meta = f.metadata
    if isinstance(typed, str) and "choices" in meta:  # "ethan" means Ethan
        typed = next((c for c in meta["choices"] if str(c).lower() == typed.lower()), typed)
    problem = None
    if typed is None:
        problem = f"must be {_kind_word(kind)}"
    elif "choices" in meta and typed not in meta["choices"]:
        shown = ", ".join(str(c) for c in meta["choices"])
        problem = f"must be one of {shown}" if len(meta["choices"]) > 1 else f"must be {shown}"
    elif "range" in meta:
        lo, hi = meta["range"]
        if (lo is not None and typed < lo) or (hi is not None and typed > hi):
            problem = f"must be between {lo} and {hi}"
    elif meta.get("nonempty") and not str(typed).strip():
        problem = "must not be empty"
    if problem:
        raise DuplexError(f"Bad config value {dotted} = {value!r} (from {origin}): {problem}.")
    return typed


def _kind_word(kind: type) -> str:
    return {bool: "true or false", int: "a whole number", float: "a number", str: "text"}[kind]


def _coerce(value: Any, kind: type) -> Any:
    """Turn a TOML, env or flag value into `kind`, or None when it cannot be one."""
    if kind is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in ("1", "true", "yes", "on"):
            return True
        if isinstance(value, str) and value.strip().lower() in ("0", "false", "no", "off"):
            return False
        return None
    if kind is str:
        return value if isinstance(value, str) else None
    if isinstance(value, bool):
        return None
    try:
        number = kind(value) if not isinstance(value, str) else kind(value.strip())
    except (TypeError, ValueError):
        if kind is int and isinstance(value, str):
            try:
                as_float = float(value)
            except ValueError:
                return None
            return int(as_float) if as_float.is_integer() else None
        return None
    if kind is int and isinstance(value, float) and not value.is_integer():
        return None
    return number


def _check_relations(s: Settings) -> None:
    if s.vad.neg_threshold > s.vad.threshold:
        raise DuplexError(
            f"Bad config: vad.neg_threshold ({s.vad.neg_threshold}, from "
            f"{s.sources['vad.neg_threshold']}) must not exceed vad.threshold ({s.vad.threshold})."
        )
    if s.turn.fallback_ms <= s.turn.pause_ms:
        raise DuplexError(
            f"Bad config: turn.fallback_ms ({s.turn.fallback_ms}, from "
            f"{s.sources['turn.fallback_ms']}) must be longer than turn.pause_ms "
            f"({s.turn.pause_ms}, from {s.sources['turn.pause_ms']})."
        )
    decided = (("vad.end_of_turn_ms", s.vad.end_of_turn_ms) if s.turn.policy == "silence"
               else ("turn.fallback_ms", s.turn.fallback_ms))
    if s.turn.speculate_ms >= decided[1]:
        raise DuplexError(
            f"Bad config: turn.speculate_ms ({s.turn.speculate_ms}, from "
            f"{s.sources['turn.speculate_ms']}) must be shorter than the silence that ends a turn "
            f"({decided[0]} = {decided[1]}), or 0 for no speculative start."
        )
    if s.qwen.load_in_8bit and s.qwen.quantize != "none":
        raise DuplexError(
            f"Bad config: qwen.load_in_8bit (from {s.sources['qwen.load_in_8bit']}) and "
            f"qwen.quantize = {s.qwen.quantize} (from {s.sources['qwen.quantize']}) both quantize "
            "the weights; choose one (qwen.quantize saves far more)."
        )
    if s.qwen.load_in_8bit and s.qwen.device_map == "cpu":
        raise DuplexError(
            "Bad config: qwen.load_in_8bit needs a CUDA GPU but qwen.device_map is cpu (from "
            f"{s.sources['qwen.device_map']})."
        )
