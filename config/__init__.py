"""Configuration and the user-facing error type, shared by every other package."""

from .errors import DuplexError
from .settings import (
    DTYPES,
    VOICES,
    AudioSettings,
    QwenSettings,
    ServeSettings,
    Settings,
    TurnSettings,
    UiSettings,
    VadSettings,
    default_config_text,
    load_settings,
)

__all__ = [
    "DTYPES",
    "VOICES",
    "AudioSettings",
    "DuplexError",
    "QwenSettings",
    "ServeSettings",
    "Settings",
    "TurnSettings",
    "UiSettings",
    "VadSettings",
    "default_config_text",
    "load_settings",
]
