"""The page in a real browser: headless Chromium (Debian's `chromium` and `chromium-driver`)
driven by selenium, its microphone a wav file (../shared/notes/browser.md has the options)."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import numpy as np
import pytest

from duplex_chat.server import ServerState

from .audio_helpers import espeak_speech, write_audio
from .fake_engine import Reply, ScriptedConversation, chirp
from .serve_helpers import running_server, serve_settings

CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")

pytestmark = [
    pytest.mark.browser,
    pytest.mark.slow,
    pytest.mark.skipif(CHROMIUM is None or CHROMEDRIVER is None,
                       reason="needs Debian's chromium and chromium-driver (apt-get install "
                              "chromium chromium-driver)"),
]


def browser(mic_wav: Path):
    """Headless Chromium whose microphone plays `mic_wav` in a loop."""
    webdriver = pytest.importorskip("selenium.webdriver", reason="needs selenium (pip install selenium)")
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream",
                 f"--use-file-for-fake-audio-capture={mic_wav}",
                 "--autoplay-policy=no-user-gesture-required", "--window-size=900,700"):
        options.add_argument(flag)
    return webdriver.Chrome(options=options, service=Service(CHROMEDRIVER))


def wait_until(driver, script: str, timeout: float = 30.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = driver.execute_script(script)
        if value:
            return value
        time.sleep(0.2)
    stats = driver.execute_script("return window.duplexStats")
    raise AssertionError(f"page never got to `{script}`; stats {stats}")


def test_the_page_talks_through_a_real_browser(tmp_path):
    # Speech then silence, looped by Chromium: a turn every few seconds.
    speech = espeak_speech("Hello, how are you today?")
    mic = write_audio(tmp_path / "mic.wav", np.concatenate(
        [np.zeros(8000, np.float32), speech, np.zeros(5 * 16_000, np.float32)]), 16_000, subtype="PCM_16")
    conversation = ScriptedConversation([Reply(chirp(1.5), ("Hello", "there."))])
    state = ServerState(serve_settings(), conversation)
    with running_server(state) as address:
        driver = browser(Path(mic))
        try:
            driver.get(f"http://{address}/")
            driver.find_element("id", "connect").click()
            wait_until(driver, "return window.duplexStats.micFrames > 50")
            wait_until(driver, "return window.duplexStats.replyBytes > 0")
            wait_until(driver, "return window.duplexStats.events.includes('reply.done')")
            stats = driver.execute_script("return window.duplexStats")
            transcript = driver.find_element("id", "transcript").text
            latency = driver.find_element("id", "latency").text
            driver.save_screenshot(str(tmp_path / "page.png"))
        finally:
            driver.quit()
    assert stats["errors"] == []
    assert stats["replyBytes"] == 2 * len(chirp(1.5))  # the whole reply, as PCM16
    assert stats["played"] == len(chirp(1.5))  # played to its end, and reported
    assert "Hello there." in transcript
    assert latency.endswith(" ms")
    assert conversation.called("end_turn")
