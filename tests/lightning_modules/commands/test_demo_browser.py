"""``ctrlkit demo`` in a real headless browser (Chromium driven by Selenium): load the page, set a source image,
add a canny unit, generate, read the result image back; draw two GLIGEN boxes, type their phrases, generate. Run
with ``python -m pytest -m browser -rs`` (CI step 5, which installs the ``demo`` extra and Debian's ``chromium
chromium-driver``); skipped, with the reason, where any of them is missing. ``CTRLKIT_DEMO_SCREENSHOT=<file.png>``
also saves the page after generating there (the README's picture is made so)."""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from conditions.shapes import render_scene

pytestmark = pytest.mark.browser

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
CHROMEDRIVER = shutil.which("chromedriver")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def demo_url(tmp_path_factory):
    """``ctrlkit demo`` served from a subprocess on a free port, as a user starts it; its URL."""
    pytest.importorskip("gradio", reason='the demo extra is not installed: pip install -e ".[demo]"')
    run = tmp_path_factory.mktemp("demo")
    port = free_port()
    command = [sys.executable, "-m", "lightning_modules.commands.cli", "demo", f"server_port={port}",
               f"hydra.run.dir={run}", f"adapters_dir={run}", "num_inference_steps=10"]  # fmt: skip
    log = open(run / "server.log", "w")  # noqa: SIM115 - the server writes to it until teardown
    server = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "NO_PROXY": "*"})
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and server.poll() is None:
        try:
            urllib.request.urlopen(url, timeout=2)
            break
        except OSError:
            time.sleep(1)
    else:
        server.kill()
        pytest.fail(f"ctrlkit demo did not serve {url}:\n{(run / 'server.log').read_text()[-3000:]}")
    yield url
    server.terminate()
    server.wait(timeout=30)
    log.close()


@pytest.fixture(scope="module")
def browser():
    webdriver = pytest.importorskip("selenium.webdriver", reason='Selenium is not installed: pip install -e ".[demo]"')
    if CHROMIUM is None or CHROMEDRIVER is None:
        pytest.skip("Chromium and its driver are not installed (Debian: apt-get install chromium chromium-driver)")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,1900"):
        options.add_argument(argument)
    from selenium.webdriver.chrome.service import Service

    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)  # the system driver: no download
    yield driver
    driver.quit()


def choose_adapter(browser, wait, unit: int, name: str) -> None:
    """Open unit ``unit``'s adapter dropdown and click ``name`` in its list (as a user does)."""
    from selenium.webdriver.common.by import By

    browser.find_element(By.CSS_SELECTOR, f"#unit{unit}-adapter input").click()
    option = f'#unit{unit}-adapter li[aria-label="{name}"]'
    wait.until(lambda driver: driver.find_elements(By.CSS_SELECTOR, option))
    browser.find_element(By.CSS_SELECTOR, option).click()


def generate_and_read(browser, wait) -> tuple[int, np.ndarray]:
    """Press generate; (the number of units the status line reports, the result image read back over HTTP)."""
    from selenium.webdriver.common.by import By

    previous = browser.find_element(By.ID, "status").text
    browser.find_element(By.ID, "generate").click()

    def finished(driver):
        text = driver.find_element(By.ID, "status").text
        return text != previous and re.search(r"(\d+) unit\(s\)", text)

    status = wait.until(finished)
    result = wait.until(lambda driver: driver.find_elements(By.CSS_SELECTOR, "#result img"))[0]
    with urllib.request.urlopen(result.get_attribute("src"), timeout=30) as response:
        image = np.asarray(Image.open(io.BytesIO(response.read())).convert("RGB"))
    return int(status.group(1)), image


def test_page_generates_under_a_canny_unit_and_shows_the_result(browser, demo_url, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    source = tmp_path / "scene.png"
    Image.fromarray(render_scene(np.random.default_rng(7), 64).image).save(source)
    browser.get(demo_url)
    wait = WebDriverWait(browser, 120)
    wait.until(lambda driver: driver.find_elements(By.ID, "generate"))

    browser.find_element(By.CSS_SELECTOR, "#source input[type=file]").send_keys(str(source))
    # the extractor maps appear (canny's among them) once the source is read
    wait.until(lambda driver: len(driver.find_elements(By.CSS_SELECTOR, "#previews img")) >= 2)
    choose_adapter(browser, wait, 0, "tiny/controlnet_canny")
    # choosing the adapter picks the condition it was trained on
    condition = browser.find_element(By.CSS_SELECTOR, "#unit0-condition input")
    wait.until(lambda driver: condition.get_attribute("value") == "canny")
    units, image = generate_and_read(browser, wait)

    assert units == 1
    assert image.shape == (64, 64, 3)
    assert image.std() > 10  # not blank
    assert len(browser.find_elements(By.CSS_SELECTOR, "#downloads a")) >= 2  # the PNG and composition.yaml
    if os.environ.get("CTRLKIT_DEMO_SCREENSHOT"):
        Path(os.environ["CTRLKIT_DEMO_SCREENSHOT"]).parent.mkdir(parents=True, exist_ok=True)
        assert browser.save_screenshot(os.environ["CTRLKIT_DEMO_SCREENSHOT"])
    assert browser.save_screenshot(str(tmp_path / "demo.png"))


def test_boxes_drawn_on_the_canvas_ground_a_gligen_unit(browser, demo_url):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    browser.get(demo_url)
    wait = WebDriverWait(browser, 120)
    wait.until(lambda driver: driver.find_elements(By.ID, "generate"))
    next(b for b in browser.find_elements(By.CSS_SELECTOR, "button") if "GLIGEN boxes" in b.text).click()
    canvas = wait.until(lambda driver: driver.find_elements(By.CSS_SELECTOR, "#sketch canvas"))[-1]
    # two strokes: a square outline in the top left, a dash lower right
    strokes = ActionChains(browser).move_to_element_with_offset(canvas, -60, -60).click_and_hold()
    strokes.move_by_offset(40, 0).move_by_offset(0, 40).move_by_offset(-40, 0).move_by_offset(0, -40).release()
    strokes.move_to_element_with_offset(canvas, 30, 30).click_and_hold().move_by_offset(50, 10).release().perform()
    boxes_field = browser.find_element(By.CSS_SELECTOR, "#boxes textarea")
    wait.until(lambda driver: boxes_field.get_attribute("value").count("]") == 3)  # [[...], [...]]
    boxes = json.loads(boxes_field.get_attribute("value"))
    assert boxes[0][0] < boxes[1][0] and boxes[0][1] < boxes[1][1]  # left one first
    browser.find_element(By.CSS_SELECTOR, "#phrases textarea").send_keys("a red circle; a blue square")
    choose_adapter(browser, wait, 0, "tiny/gligen_masked_boxes")
    condition = browser.find_element(By.CSS_SELECTOR, "#unit0-condition input")
    wait.until(lambda driver: condition.get_attribute("value") == "boxes (drawn)")

    units, image = generate_and_read(browser, wait)

    assert units == 1 and image.std() > 10
    links = [a.get_attribute("href") or "" for a in browser.find_elements(By.CSS_SELECTOR, "#downloads a")]
    composition = next(link for link in links if link.endswith("composition.yaml"))
    with urllib.request.urlopen(composition, timeout=30) as response:
        (unit,) = yaml.safe_load(response.read())["units"]
    assert unit["boxes"] == boxes and unit["phrases"] == ["a red circle", "a blue square"]
