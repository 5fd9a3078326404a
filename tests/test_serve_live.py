"""`ldmkit serve` as a user runs it: a real uvicorn process on a free localhost port with
the tiny model, a client that hangs up, and the page driven in headless Chromium
(Debian's chromium + chromium-driver, which .ci/run installs)."""

from __future__ import annotations

import http.client
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ldmkit.cli import main

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(port: int, path: str) -> dict:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("GET", path)
        return json.loads(conn.getresponse().read())
    finally:
        conn.close()


@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory):
    """(port, process) of `ldmkit serve` on the tiny model; stopped after the module."""
    port = _free_port()
    log = open(tmp_path_factory.mktemp("serve") / "serve.log", "w+")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "ldmkit.cli", "serve", "--model",
                             str(model_dir), "--port", str(port), "--device", "cpu",
                             "--log-level", "warning"], stdout=log, stderr=subprocess.STDOUT,
                            env=env)
    deadline = time.monotonic() + 90
    while True:
        try:
            if _get(port, "/health")["status"] == "ok":
                break
        except OSError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            log.seek(0)
            proc.kill()
            pytest.fail(f"ldmkit serve did not come up:\n{log.read()[-3000:]}")
        time.sleep(0.2)
    yield port, proc
    proc.terminate()
    try:
        proc.wait(20)
    except subprocess.TimeoutExpired:
        proc.kill()
    log.close()


def test_serve_refuses_cuda_where_there_is_none(model_dir, capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    assert main(["serve", "--model", str(model_dir), "--device", "cuda"]) == 2
    assert "--device cuda: no CUDA device" in capsys.readouterr().err


def test_serve_refuses_a_port_in_use_and_a_missing_model(model_dir, tmp_path, capsys):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert main(["serve", "--model", str(model_dir), "--port", str(port)]) == 2
    assert "cannot listen" in capsys.readouterr().err
    assert main(["serve", "--model", str(tmp_path / "nope"), "--port", "0"]) == 2


@pytest.fixture(scope="module")
def slow_server(model_dir):
    """The app in uvicorn (in this process) over a pipeline slowed to 20 ms a step, so a
    client can hang up while its job is certainly still running."""
    import threading

    import uvicorn

    from ldmkit.pipeline import TextToImagePipeline
    from ldmkit.server.app import create_app

    pipe = TextToImagePipeline.from_pretrained(model_dir)
    denoise = pipe.denoise

    def slow(*args, callback, **kwargs):
        def step(*a):
            time.sleep(0.02)
            callback(*a)
        return denoise(*args, callback=step, **kwargs)

    pipe.denoise = slow
    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(pipe), host="127.0.0.1", port=port,
                                           log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "uvicorn did not start"
        time.sleep(0.05)
    yield port
    server.should_exit = True
    thread.join(30)


@pytest.mark.parametrize("path", ["/v1/images", "/v1/images/stream"])
def test_a_client_that_hangs_up_has_its_work_dropped(slow_server, path):
    port = slow_server
    before = _get(port, "/health")
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    body = {"prompt": "a red circle", "steps": 50, "seed": 1}  # 50 x 20 ms at least
    conn.request("POST", path, json.dumps(body), {"Content-Type": "application/json"})
    deadline = time.monotonic() + 30
    while _get(port, "/health")["running"] == 0:  # generation is under way
        assert time.monotonic() < deadline
        time.sleep(0.01)
    conn.sock.shutdown(socket.SHUT_RDWR)  # the client goes away mid-generation
    conn.close()
    while _get(port, "/health")["cancelled"] == before["cancelled"]:
        assert time.monotonic() < deadline, "the server kept the abandoned job"
        time.sleep(0.02)
    health = _get(port, "/health")
    assert health["completed"] == before["completed"]  # never finished for nobody
    assert health["cancelled"] == before["cancelled"] + 1 and health["running"] == 0


# ----------------------------------------------------------------------------- browser


@pytest.fixture
def driver(tmp_path: Path):
    """Headless Debian Chromium through its own chromedriver (no download of either),
    quit after the test."""
    if not (CHROMIUM and CHROMEDRIVER):
        if os.environ.get("CI"):
            pytest.fail("CI must install chromium and chromium-driver (.ci/run does)")
        pytest.skip("needs Debian's chromium and chromium-driver "
                    "(apt-get install -y chromium chromium-driver)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--window-size=1000,900",
                 f"--user-data-dir={tmp_path / 'profile'}"):
        options.add_argument(flag)
    browser = webdriver.Chrome(options=options, service=Service(executable_path=CHROMEDRIVER))
    yield browser
    browser.quit()


def _open_page(driver, port: int, fields: dict[str, str]):
    """The page loaded (its sampler list filled from /v1/model), the fields typed in; the
    WebDriverWait the test goes on with."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait

    wait = WebDriverWait(driver, 60)
    driver.get(f"http://127.0.0.1:{port}/")
    wait.until(lambda d: len(Select(d.find_element(By.ID, "sampler")).options) > 0)
    for field, value in fields.items():
        box = driver.find_element(By.ID, field)
        box.clear()
        box.send_keys(value)
    return wait


def test_the_page_generates_an_image_in_a_real_browser(server, driver, tmp_path):
    from selenium.webdriver.common.by import By

    port, _ = server
    wait = _open_page(driver, port, {"prompt": "a small red circle left of a blue square",
                                     "steps": "12", "seed": "3"})
    # count the live previews as they are shown (they come and go fast on this model)
    driver.execute_script("""
        window.shown = 0;
        new MutationObserver(() => window.shown++).observe(
            document.getElementById('live'), {attributes: true, attributeFilter: ['src']});
    """)
    driver.find_element(By.ID, "generate").click()
    image = wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#gallery img.result"))[0]
    wait.until(lambda d: d.execute_script(
        "return arguments[0].complete && arguments[0].naturalWidth > 0", image))
    assert image.get_property("naturalWidth") == 16  # the model's image size
    assert driver.execute_script("return window.shown") >= 3  # previews, then the final
    card = driver.find_element(By.CSS_SELECTOR, "#gallery .card").text
    assert "a small red circle left of a blue square" in card and "seed 3" in card
    assert "rescale 0.7" in card  # the headline guidance rescale, reported back
    assert driver.find_element(By.ID, "status").text.startswith("done")
    seed = driver.find_element(By.ID, "seed")  # a second image joins the gallery, first
    seed.clear()
    seed.send_keys("4")
    driver.find_element(By.ID, "generate").click()
    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#gallery img.result")) == 2)
    newest = driver.find_element(By.CSS_SELECTOR, "#gallery .card").text
    assert "seed 4" in newest
    wait.until(lambda d: d.find_element(By.ID, "generate").is_enabled())
    driver.save_screenshot(str(tmp_path / "page.png"))
    if os.environ.get("LDMKIT_SCREENSHOT"):  # how docs/images/serve_page.png is made
        driver.save_screenshot(os.environ["LDMKIT_SCREENSHOT"])


def _with_a_picture(driver, port: int, tmp_path: Path, fields: dict[str, str]):
    """The page with `fields` typed in and a grey 16x16 picture chosen to edit (the edit
    box opened); the WebDriverWait."""
    from PIL import Image
    from selenium.webdriver.common.by import By

    picture = tmp_path / "grey.png"
    Image.new("RGB", (16, 16), (120, 120, 120)).save(picture)
    wait = _open_page(driver, port, fields)
    driver.find_element(By.CSS_SELECTOR, "#edit-box summary").click()
    driver.find_element(By.ID, "picture").send_keys(str(picture))
    return wait


def test_the_page_edits_a_chosen_picture_and_says_so(server, driver, tmp_path):
    from selenium.webdriver.common.by import By

    port, _ = server
    wait = _with_a_picture(driver, port, tmp_path,
                           {"prompt": "a blue square", "steps": "6", "seed": "1"})
    strength = driver.find_element(By.ID, "strength")
    strength.clear()
    strength.send_keys("0.5")
    driver.find_element(By.ID, "source_prompt").send_keys("a red square")
    driver.find_element(By.ID, "generate").click()
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#gallery img.result"))
    card = driver.find_element(By.CSS_SELECTOR, "#gallery .card").text
    assert "a blue square" in card
    assert "edit at strength 0.5 of “a red square” (layout edit)" in card
    assert "layout edit samples with the DDPM posterior" in card  # its warning, shown
    if os.environ.get("LDMKIT_EDIT_SCREENSHOT"):  # to look at the edit box by eye
        driver.save_screenshot(os.environ["LDMKIT_EDIT_SCREENSHOT"])
    driver.find_element(By.ID, "source_prompt").clear()
    driver.find_element(By.ID, "source_prompt").send_keys("the")  # nothing to blend on
    driver.find_element(By.ID, "generate").click()
    wait.until(lambda d: "source_prompt" in d.find_element(By.ID, "status").text)
    assert "error" in driver.find_element(By.ID, "status").get_attribute("class")


def test_the_page_inpaints_under_a_painted_mask(server, driver, tmp_path):
    import base64
    import io

    import numpy as np
    from PIL import Image
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By

    port, _ = server
    wait = _with_a_picture(driver, port, tmp_path,
                           {"prompt": "a red circle", "steps": "4", "seed": "2"})
    canvas = wait.until(lambda d: d.find_element(By.ID, "mask") if d.execute_script(
        "return document.getElementById('mask').width") == 16 else None)
    driver.execute_script("""  // keep the request the page sends
        window.sent = null;
        const plain = window.fetch;
        window.fetch = (url, options) => {
          if (options && options.body) window.sent = JSON.parse(options.body);
          return plain(url, options);
        };""")
    # drag down the canvas's left quarter (it shows 16 pixels as 256)
    driver.execute_script("arguments[0].scrollIntoView({block: 'center'})", canvas)
    ActionChains(driver).move_to_element_with_offset(canvas, -96, -100).click_and_hold() \
        .move_by_offset(0, 200).release().perform()
    driver.find_element(By.ID, "generate").click()
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#gallery img.result"))
    sent = driver.execute_script("return window.sent")
    mask = np.asarray(Image.open(io.BytesIO(base64.b64decode(sent["mask"]))).convert("L"))
    assert mask.shape == (16, 16) and set(np.unique(mask)) == {0, 255}
    assert mask[:, :6].max() == 255 and mask[:, 10:].max() == 0  # white where painted
    assert "edit at strength 0.8" in driver.find_element(By.CSS_SELECTOR, "#gallery .card").text
    driver.find_element(By.ID, "clear-mask").click()
    driver.find_element(By.ID, "generate").click()
    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#gallery img.result")) == 2)
    assert "mask" not in driver.execute_script("return window.sent")  # cleared: img2img


def test_the_page_asks_for_the_key_once_when_the_server_has_one(model_dir, driver, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait

    from _serve_process import serve_process

    with serve_process(model_dir, tmp_path / "serve.log", "--api-key", "page-key") as port:
        wait = WebDriverWait(driver, 60)
        driver.get(f"http://127.0.0.1:{port}/")
        box = driver.find_element(By.ID, "key-box")
        wait.until(lambda d: box.is_displayed())
        assert "needs an API key" in driver.find_element(By.ID, "status").text
        driver.find_element(By.ID, "api-key").send_keys("wrong")
        driver.find_element(By.ID, "use-key").click()
        wait.until(lambda d: "refused that API key" in d.find_element(By.ID, "status").text)
        field = driver.find_element(By.ID, "api-key")
        field.clear()
        field.send_keys("page-key")
        driver.find_element(By.ID, "use-key").click()
        wait.until(lambda d: len(Select(d.find_element(By.ID, "sampler")).options) > 0)
        assert not box.is_displayed()
        steps = driver.find_element(By.ID, "steps")
        steps.clear()
        steps.send_keys("3")
        driver.find_element(By.ID, "generate").click()
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#gallery img.result"))
        driver.refresh()  # asked once: the key is kept for this origin
        wait.until(lambda d: len(Select(d.find_element(By.ID, "sampler")).options) > 0)
        assert not driver.find_element(By.ID, "key-box").is_displayed()
