"""The README's set-up and test commands are the ones CI runs, and they work with and without root.

CI (`.ci/run`) is meant to follow a new user's path. These tests fail when the README's lines and
CI's part, so neither can be changed alone.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text(encoding="utf-8")
CI_RUN = (ROOT / ".ci" / "run").read_text(encoding="utf-8")

# What the tests need from the system: tests/virtual_audio.py (pulseaudio, pactl, ALSA's pulse
# plugin), tests/audio_helpers.py (espeak-ng), the talk tests (PortAudio), the serve page test
# (chromium, chromium-driver).
TEST_PACKAGES = {"libportaudio2", "pulseaudio", "pulseaudio-utils", "libasound2-plugins",
                 "espeak-ng", "chromium", "chromium-driver"}


def first_sh_block(heading: str) -> list[str]:
    """The lines of the first ```sh block after the README heading `heading` (a whole line)."""
    start = README.index(f"\n{heading}\n")
    match = re.compile(r"^```sh\n(.*?)^```$", re.S | re.M).search(README, start)
    assert match, f"no sh block after {heading!r}"
    return [line.strip() for line in match.group(1).splitlines() if line.strip()]


SET_UP = first_sh_block("## Set up and run")
TESTS = first_sh_block("### Tests")


def ci_commands() -> list[str]:
    return [line.strip() for line in CI_RUN.splitlines()
            if line.strip() and not line.strip().startswith("#")]


def test_ci_runs_the_readmes_set_up_and_test_lines_word_for_word():
    ci = ci_commands()
    start = ci.index(SET_UP[0]) if SET_UP[0] in ci else None
    assert start is not None, f"{SET_UP[0]!r} is not in .ci/run"
    assert ci[start:start + len(SET_UP)] == SET_UP, "README's set-up lines differ from .ci/run's"
    assert ci[-len(TESTS):] == TESTS, ".ci/run does not end with the README's test command"


def test_the_readme_installs_every_system_package_the_tests_need():
    apt = [line for line in SET_UP if "apt-get install" in line]
    assert len(apt) == 1, apt
    assert "-y" in apt[0].split(), "apt-get install asks for confirmation without -y"
    missing = TEST_PACKAGES - set(apt[0].split())
    assert not missing, f"the README's apt-get line lacks {sorted(missing)}"
    assert any(line.endswith("apt-get update") for line in SET_UP[:SET_UP.index(apt[0])])


@pytest.mark.parametrize("uid,expected", [("0", ""), ("1000", "sudo")])
def test_the_set_up_uses_sudo_only_for_a_normal_user(tmp_path, uid, expected):
    # Root on a Debian image has no sudo; a normal user needs it. Run the README's first line
    # with an `id` that answers `uid`.
    fake_id = tmp_path / "id"
    fake_id.write_text(f"#!/bin/sh\necho {uid}\n")
    fake_id.chmod(0o755)
    assignment = SET_UP[0]
    assert assignment.startswith("SUDO=")
    script = f'{assignment}\nprintf "%s" "$SUDO"\n'
    env = {**os.environ, "PATH": f"{tmp_path}{os.pathsep}{os.environ['PATH']}"}
    out = subprocess.run(["sh", "-c", script], env=env, capture_output=True, text=True, check=True)
    assert out.stdout == expected
    assert all(line.startswith("$SUDO ") for line in SET_UP if "apt-get" in line)


@pytest.mark.skipif(shutil.which("bash") is None, reason="bash is not installed")
def test_the_readme_and_ci_lines_are_valid_shell():
    for name, text in [("README set-up", "\n".join(SET_UP)), (".ci/run", CI_RUN)]:
        result = subprocess.run(["bash", "-n"], input=text, capture_output=True, text=True)
        assert result.returncode == 0, f"{name}: {result.stderr}"
