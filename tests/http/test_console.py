"""The web console in a real headless Chromium (Debian's chromium + chromium-driver, driven by Selenium): sign in,
see the node, upload the astronaut, find the drawn face box, watch the live stream. Screenshots are saved."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from tests.agent_proc import REPO
from tests.http.conftest import ASTRONAUT_FACE, Api

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
ARTIFACTS = Path(os.environ.get("CVW_TEST_ARTIFACTS", REPO / "build" / "test-artifacts"))


@pytest.fixture
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    if not (Path(CHROMIUM).exists() and Path(CHROMEDRIVER).exists()):
        pytest.fail("Debian's chromium and chromium-driver are needed: `make test` installs them "
                    "(apt-get install chromium chromium-driver)")
    opts = Options()
    opts.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1280,1800", "--disable-extensions", "--no-first-run"):
        opts.add_argument(arg)
    # An explicit driver path: Selenium Manager must not try to download one.
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=opts)
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


def test_console_shows_node_and_draws_the_face(browser, api: Api, token: str, astronaut_jpeg: Path, tmp_path: Path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import Select, WebDriverWait

    wait = WebDriverWait(browser, 60)
    shots = []

    def shot(name: str) -> None:
        path = tmp_path / f"{name}.png"
        assert browser.save_screenshot(str(path)) and path.stat().st_size > 10_000
        shots.append(path)

    # A wrong token: the sign-in form says so.
    browser.get(f"{api.base}/?token=not-the-token")
    wait.until(ec.visibility_of_element_located((By.ID, "login")))
    wait.until(lambda d: "not accepted" in d.find_element(By.ID, "login-error").text)
    assert "not-the-token" not in browser.current_url  # the token never stays in the address bar
    # The right one, typed in.
    browser.find_element(By.ID, "token").send_keys(token)
    browser.find_element(By.CSS_SELECTOR, "#login button[type=submit]").click()
    wait.until(ec.visibility_of_element_located((By.ID, "app")))
    wait.until(lambda d: d.find_element(By.ID, "node-id").text == "http-node")
    wait.until(lambda d: "MQTT connected" in d.find_element(By.ID, "conn").text)
    wait.until(lambda d: "blazeface" in d.find_element(By.ID, "models").text)
    assert browser.execute_script("return localStorage.getItem('cvw-token')") == token

    # Try a model: upload the astronaut, run BlazeFace, find the face box drawn over the image.
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#try-model option[value=blazeface]"))
    Select(browser.find_element(By.ID, "try-model")).select_by_value("blazeface")
    browser.find_element(By.ID, "try-image").send_keys(str(astronaut_jpeg))
    browser.find_element(By.ID, "try-run").click()
    box = wait.until(ec.visibility_of_element_located((By.CSS_SELECTOR, "#try-boxes .box[data-label=face]")))
    coords = [float(box.get_attribute(f"data-{k}")) for k in ("x1", "y1", "x2", "y2")]
    assert all(abs(a - b) <= 15 for a, b in zip(coords, ASTRONAUT_FACE)), coords
    assert len(browser.find_elements(By.CSS_SELECTOR, "#try-boxes .box")) == 1
    # Drawn where the face is: the box's on-screen rectangle, mapped back to image pixels, is the face.
    geo = browser.execute_script("""
        const img = document.getElementById('try-img'), b = arguments[0];
        const i = img.getBoundingClientRect(), r = b.getBoundingClientRect();
        const s = img.naturalWidth / i.width;
        return [(r.left - i.left) * s, (r.top - i.top) * s, (r.right - i.left) * s, (r.bottom - i.top) * s];
    """, box)
    assert all(abs(a - b) <= 15 for a, b in zip(geo, ASTRONAUT_FACE)), geo
    assert "face 0.9" in box.text
    assert "1 detection" in browser.find_element(By.ID, "try-status").text
    browser.execute_script("arguments[0].scrollIntoView()", box)
    shot("console-try-a-model")

    # The prediction is an ordinary job in the recent-jobs table; the stream's live view shows frames.
    wait.until(lambda d: "SUCCEEDED" in d.find_element(By.ID, "jobs").text and "infer" in d.find_element(
        By.ID, "jobs").text)
    live = wait.until(ec.presence_of_element_located((By.CSS_SELECTOR, ".stream img")))
    assert "/v1/streams/lobby/mjpeg" in live.get_attribute("src")
    wait.until(lambda d: d.execute_script("return arguments[0].naturalWidth", live) == 320)
    assert "running" in browser.find_element(By.ID, "streams").text

    # A phone: everything fits the width.
    browser.set_window_size(390, 844)
    browser.execute_script("window.scrollTo(0, 0)")
    assert browser.execute_script("return document.documentElement.scrollWidth <= window.innerWidth + 1")
    shot("console-phone")

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    for p in shots:
        shutil.copy(p, ARTIFACTS / p.name)
    print(f"console screenshots: {', '.join(str(ARTIFACTS / p.name) for p in shots)}")
