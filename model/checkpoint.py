"""Is this directory a loadable Qwen3-Omni checkpoint? One rule, for `check` and the loader.

`check` (through `footprint.hub_cache_status`) and `loading.load_model` used to answer by rules of
their own, so `check` could call a directory ready that loading then refused. Both ask
`inspect_checkpoint` now, and show its one-sentence answer.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

MODEL_TYPE = "qwen3_omni_moe"
CONFIG_FILE = "config.json"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
SAFETENSORS_INDEX = "model.safetensors.index.json"


@dataclass(frozen=True)
class Inspection:
    """problem: one sentence saying why the directory cannot be loaded, or None when it can;
    missing: the files it lacks (config.json, weight shards an index names, or "weights" when
    there are none); config: the parsed config.json when it is a Qwen3-Omni one."""

    problem: str | None
    missing: tuple[str, ...] = field(default_factory=tuple)
    config: dict | None = None


def inspect_checkpoint(path: Path) -> Inspection:
    """What `path` (an existing directory) holds, read from the disk only."""
    config_file = path / CONFIG_FILE
    if not config_file.is_file():
        return Inspection(f"{path} is not a Qwen3-Omni checkpoint: it has no {CONFIG_FILE}.",
                          (CONFIG_FILE,))
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        return Inspection(f"{config_file} is not valid JSON.")
    model_type = config.get("model_type") if isinstance(config, dict) else None
    if model_type != MODEL_TYPE:
        return Inspection(f"{path} is not a Qwen3-Omni checkpoint: its model_type is "
                          f"{model_type!r}, expected {MODEL_TYPE!r}.")
    missing = missing_weights(path)
    if missing == ("weights",):
        return Inspection(f"{path} has a Qwen3-Omni config but no weight files (*.safetensors).",
                          missing)
    if missing:
        return Inspection(f"{path} lacks {len(missing)} weight file(s) its index names: "
                          f"{', '.join(missing[:3])}.", missing)
    return Inspection(None, (), config)


def missing_weights(directory: Path) -> tuple[str, ...]:
    """Weight files an index names but the directory lacks; ("weights",) when there are none."""
    index = directory / SAFETENSORS_INDEX
    if index.is_file():
        shards = set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values())
        return tuple(sorted(s for s in shards if not (directory / s).is_file()))
    has_weights = any(f.suffix in WEIGHT_SUFFIXES for f in directory.iterdir() if f.is_file())
    return () if has_weights else ("weights",)
