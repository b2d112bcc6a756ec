"""The page in a real browser: headless Chromium (Debian's `chromium` and `chromium-driver`)
driven by selenium, its microphone a wav file (../shared/notes/browser.md has the options)."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

from duplex_chat.server import ServerState, check_serve_settings

from .audio_helpers import espeak_speech, write_audio
from .fake_engine import Reply, ScriptedConversation, chirp
from .serve_helpers import lan_address, running_server, serve_settings

CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")
OPENSSL = shutil.which("openssl")

pytestmark = [
    pytest.mark.browser,
    pytest.mark.slow,
    pytest.mark.skipif(CHROMIUM is None or CHROMEDRIVER is None,
                       reason="needs Debian's chromium and chromium-driver (apt-get install "
                              "chromium chromium-driver)"),
]


def browser(mic_wav: Path, insecure_certs: bool = False):
    """Headless Chromium whose microphone plays `mic_wav` in a loop; `insecure_certs`: it
    accepts a self-signed certificate."""
    webdriver = pytest.importorskip("selenium.webdriver", reason="needs selenium (pip install selenium)")
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream",
                 f"--use-file-for-fake-audio-capture={mic_wav}",
                 "--autoplay-policy=no-user-gesture-required", "--window-size=900,700"):
        options.add_argument(flag)
    options.accept_insecure_certs = insecure_certs
    return webdriver.Chrome(options=options, service=Service(CHROMEDRIVER))


def Select(element):
    from selenium.webdriver.support.select import Select as _Select

    return _Select(element)


def wait_until(driver, script: str, timeout: float = 30.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = driver.execute_script(script)
        if value:
            return value
        time.sleep(0.2)
    stats = driver.execute_script("return window.duplexStats")
    raise AssertionError(f"page never got to `{script}`; stats {stats}")


def self_signed_pair(directory: Path, host: str) -> tuple[Path, Path]:
    """A throwaway certificate and key for `host`, made with openssl as the README says."""
    cert, key = directory / "cert.pem", directory / "key.pem"
    subprocess.run([OPENSSL, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-keyout", str(key), "-out", str(cert), "-subj", f"/CN={host}",
                    "-addext", f"subjectAltName=IP:{host}"], check=True, capture_output=True)
    return cert, key


def talk_through_the_page(tmp_path: Path, url: str, state: ServerState,
                          screenshot: Path | None = None, **browser_kw) -> dict:
    """Open `url`, pick the voice Chelsie and some instructions, connect, and wait for a whole
    reply: what the page showed and counted."""
    driver = browser(tmp_path / "mic.wav", **browser_kw)
    try:
        driver.get(url)
        assert driver.execute_script("return window.isSecureContext")
        Select(driver.find_element("id", "voice")).select_by_visible_text("Chelsie")
        box = driver.find_element("id", "instructions")
        box.clear()
        box.send_keys("Be a pirate.")
        driver.find_element("id", "connect").click()
        wait_until(driver, "return window.duplexStats.micFrames > 50")
        wait_until(driver, "return window.duplexStats.replyBytes > 0")
        wait_until(driver, "return window.duplexStats.events.includes('reply.done')")
        page = {"stats": driver.execute_script("return window.duplexStats"),
                "transcript": driver.find_element("id", "transcript").text,
                "latency": driver.find_element("id", "latency").text,
                "voice_locked": not driver.find_element("id", "voice").is_enabled()}
        if screenshot is not None:
            driver.execute_script("document.getElementById('instructions').blur()")
            driver.save_screenshot(str(screenshot))
    finally:
        driver.quit()
    return page


def assert_talked(page: dict, conversation: ScriptedConversation) -> None:
    """The transcript shown and the whole reply played, under the voice and instructions the
    page sent before the first reply."""
    stats = page["stats"]
    assert stats["errors"] == []
    assert stats["replyBytes"] == 2 * len(chirp(1.5))  # the whole reply, as PCM16
    assert stats["played"] == len(chirp(1.5))  # played to its end, and reported
    assert "Hello there." in page["transcript"]
    assert page["latency"].endswith(" ms")
    assert page["voice_locked"]  # the settings take effect on connect
    assert stats["events"].index("session.updated") < stats["events"].index("reply.start")
    names = [name for _, name, _ in conversation.calls]
    assert "end_turn" in names and names.index("configure", 1) < names.index("end_turn")
    assert conversation.called("configure")[-1][1] == ("Chelsie", "Be a pirate.")


@pytest.fixture
def mic(tmp_path):
    # Speech then silence, looped by Chromium: a turn every few seconds.
    speech = espeak_speech("Hello, how are you today?")
    return write_audio(tmp_path / "mic.wav", np.concatenate(
        [np.zeros(8000, np.float32), speech, np.zeros(5 * 16_000, np.float32)]), 16_000,
        subtype="PCM_16")


def test_the_page_talks_through_a_real_browser(tmp_path, mic):
    """Over http on 127.0.0.1 (a secure context, so the microphone is allowed). With
    DUPLEX_SCREENSHOT=path the page is saved there as a PNG (the README's docs/serve-page.png)."""
    conversation = ScriptedConversation([Reply(chirp(1.5), ("Hello", "there."))])
    state = ServerState(serve_settings(), conversation)
    shot = os.environ.get("DUPLEX_SCREENSHOT")
    with running_server(state) as address:
        page = talk_through_the_page(tmp_path, f"http://{address}/", state,
                                     screenshot=Path(shot) if shot else tmp_path / "page.png")
    assert_talked(page, conversation)


@pytest.mark.skipif(OPENSSL is None, reason="needs openssl to make a certificate")
def test_the_page_talks_over_https_with_a_self_signed_certificate(tmp_path, mic):
    """The headline use: the page from another machine. The server listens on this machine's
    network address (when it has one besides loopback: there http is no secure context, so
    only TLS lets the page use the microphone) with a token and a self-signed pair
    (--cert/--key); the browser accepts the certificate as a user clicking through the warning
    would (WebDriver's acceptInsecureCerts), and the socket is wss:// with the token."""
    host = lan_address() or "127.0.0.1"
    cert, key = self_signed_pair(tmp_path, host)
    conversation = ScriptedConversation([Reply(chirp(1.5), ("Hello", "there."))])
    settings = serve_settings(host=host, token="s3cret", cert=str(cert), key=str(key))
    check_serve_settings(settings)
    state = ServerState(settings, conversation)
    with running_server(state, host=host) as address:  # TLS: the settings' cert and key
        page = talk_through_the_page(tmp_path, f"https://{address}/?token=s3cret", state,
                                     insecure_certs=True)
    assert_talked(page, conversation)
