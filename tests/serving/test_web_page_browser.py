"""The web page in headless Chromium against a live server running the real `tiny` model:
start a session, the video plays through Media Source Extensions (its currentTime
advances), the prompt changes live, pause and resume work, the cluster view lists workers."""

from __future__ import annotations

import shutil
import tempfile
import time

import pytest

from serving_helpers import tiny_latency_model
from turboserve.config import TurboConfig
from turboserve.serving.app import create_app
from turboserve.serving.embedded import build_runtime
from turboserve.serving.server import ServerThread

pytestmark = pytest.mark.browser

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
selenium = pytest.importorskip("selenium", reason="pip install selenium for the browser test")
if not (CHROMIUM and CHROMEDRIVER):
    pytest.skip("Debian chromium and chromium-driver are not installed", allow_module_level=True)

from selenium import webdriver  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("browser")
    cfg = TurboConfig().with_overrides([f"serve.storage_dir='{tmp}'", "cluster.gpus=2", "cluster.min_gpus=2"])
    runtime = build_runtime(cfg, model="tiny", workers=2, latency_model=tiny_latency_model(),
                            warmup_chunks=1)
    with ServerThread(create_app(runtime, cfg)) as srv:
        yield srv


@pytest.fixture(scope="module")
def browser():
    profile = tempfile.mkdtemp(prefix="turboserve-chromium-")
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--autoplay-policy=no-user-gesture-required", f"--user-data-dir={profile}"):
        opts.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
    driver.set_page_load_timeout(60)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def js(driver, expr):
    return driver.execute_script(f"return {expr};")


def wait_until(pred, timeout_s, what):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = pred()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def test_page_plays_the_stream_and_controls_the_session(server, browser):
    browser.get(server.base_url + "/")
    assert "turboserve" in browser.title
    browser.find_element(By.ID, "prompt").clear()
    browser.find_element(By.ID, "prompt").send_keys("a lighthouse in a storm")
    browser.find_element(By.ID, "start").click()
    sid = wait_until(lambda: (t := browser.find_element(By.ID, "sid").text) != "–" and t, 30, "a session id")
    # the video plays: currentTime advances across two reads
    wait_until(lambda: js(browser, "document.getElementById('video').currentTime") > 0.5, 60,
               f"playback to start (error: {browser.find_element(By.ID, 'error').text!r})")
    t1 = js(browser, "document.getElementById('video').currentTime")
    wait_until(lambda: js(browser, "document.getElementById('video').currentTime") > t1 + 0.5, 30,
               "playback to advance")
    assert browser.find_element(By.ID, "error").text == ""
    # change the prompt live
    browser.find_element(By.ID, "new-prompt").send_keys("the storm clears at dawn")
    browser.find_element(By.ID, "set-prompt").click()
    status_prompt = lambda: js(browser, f"""(function() {{
        var x = new XMLHttpRequest(); x.open('GET', '/v1/sessions/{sid}', false);
        x.setRequestHeader('Authorization', 'Bearer ' + current.token); x.send();
        return JSON.parse(x.responseText).prompt; }})()""")
    wait_until(lambda: status_prompt() == "the storm clears at dawn", 10, "the new prompt")
    # pause, then resume
    browser.find_element(By.ID, "pause").click()
    wait_until(lambda: browser.find_element(By.ID, "state").text in ("idle", "offloaded"), 15, "paused state")
    chunks_paused = int(browser.find_element(By.ID, "chunks").text)
    browser.find_element(By.ID, "resume").click()
    wait_until(lambda: int(browser.find_element(By.ID, "chunks").text) > chunks_paused + 2, 30,
               "chunks after resume")
    # the cluster view lists both CPU workers and this session on one of them
    # the page re-renders the table on every poll, so read its rows in one script call
    # (element handles held across a poll go stale)
    rows = wait_until(lambda: js(browser, "Array.from(document.querySelectorAll('#workers tbody tr'))"
                                          ".map(function(r) { return r.innerText; })"), 10, "worker rows")
    assert len(rows) == 2 and all("cpu" in r for r in rows)
    wait_until(lambda: js(browser, "document.querySelectorAll('#workers .sess.mine').length"), 10,
               "my session in the view")
    browser.find_element(By.ID, "close").click()
    wait_until(lambda: browser.find_element(By.ID, "state").text == "closed", 15, "closed state")
