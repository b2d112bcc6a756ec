"""The released Qwen3-Omni-30B-A3B-Instruct config, shipped with the package.

Used to build the full-size model with random weights (`bench --random-weights`), to size a model
that is not downloaded yet (`check`), and as the base the tiny test model is shrunk from.
"""

from __future__ import annotations

import copy
import functools
import json
from importlib import resources


@functools.cache
def _load() -> dict:
    text = (resources.files("duplex_chat.model") / "release_config.json").read_text("utf-8")
    return json.loads(text)


def release_config_dict() -> dict:
    """A fresh copy of the release config as a plain dict."""
    return copy.deepcopy(_load())
