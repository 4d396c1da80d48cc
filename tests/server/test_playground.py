"""The playground page at / in headless Chromium, against a real server of preset:tiny-sd on 127.0.0.1.

The browser is the system's Chromium and chromedriver (Debian: ``apt-get install chromium
chromium-driver``; ``.ci/run`` installs them), driven by selenium; nothing is downloaded.
Without them the tests skip and say so.

``LCMSERVE_PLAYGROUND_MODEL=shapes-lcm`` serves another model (the bundled one draws real shapes),
and ``LCMSERVE_SCREENSHOT=docs/playground.png`` saves the page at the end of the gallery test:

    LCMSERVE_PLAYGROUND_MODEL=shapes-lcm LCMSERVE_SCREENSHOT=docs/playground.png \
        .venv/bin/python -m pytest -q tests/server/test_playground.py -k gallery
"""

from __future__ import annotations

import base64
import os
import shutil

import httpx
import pytest

from lcmserve.server.loadtest import local_server

webdriver = pytest.importorskip("selenium.webdriver", reason="selenium (the dev extra) is not installed")

CHROMIUM = next(filter(None, map(shutil.which, ("chromium", "chromium-browser", "google-chrome"))), None)
CHROMEDRIVER = shutil.which("chromedriver")
API_KEY = "play-key"
MAX_PROMPT_CHARS = 120  # longer than every example prompt of the bundled models
WAIT_S = 60
MODEL = os.environ.get("LCMSERVE_PLAYGROUND_MODEL", "preset:tiny-sd")

pytestmark = [
    pytest.mark.skipif(CHROMIUM is None or CHROMEDRIVER is None,
                       reason="no chromium and chromedriver on PATH "
                              "(Debian: apt-get install chromium chromium-driver; .ci/run installs them)"),
    pytest.mark.timeout(300),
]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    log = tmp_path_factory.mktemp("playground") / "server.log"
    flags = ("--model", MODEL, "--device", "cpu", "--backend", "torch", "--api-key", API_KEY, "--max-images", "4",
             "--max-prompt-chars", str(MAX_PROMPT_CHARS), "--warmup-steps", "1", "--max-queue-delay-ms", "5")
    with local_server(*flags, log_path=log) as url:
        yield url


@pytest.fixture(scope="module")
def browser():
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                 "--window-size=1200,900"):
        options.add_argument(flag)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("SE_OFFLINE", "true")  # never let Selenium Manager look for a browser or driver online
        driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def wait_until(browser, predicate, what: str):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(browser, WAIT_S, poll_frequency=0.1).until(lambda _: predicate(), message=what)


def open_page(browser, url: str) -> None:
    """Load the playground and wait until its page is there (a first navigation can return before it is)."""
    browser.get(url)
    wait_until(browser, lambda: browser.title == "lcmserve playground"
               and browser.execute_script("return document.readyState") == "complete", "the playground to load")


def fill(browser, **values: str) -> None:
    """Type each value into the input of that id, replacing what was there."""
    for field, value in values.items():
        element = browser.find_element("id", field)
        element.clear()
        element.send_keys(value)


def generate(browser) -> None:
    browser.find_element("id", "go").click()
    wait_until(browser, lambda: browser.find_element("id", "go").is_enabled(), "the request to finish")


def figures(browser) -> list:
    return browser.find_elements("css selector", "#grid figure")


def gallery(browser) -> list[dict]:
    """The gallery's entries, newest first: prompt, parameters and image of each."""
    text = lambda entry, name: entry.find_element("class name", name).text  # noqa: E731
    return [{"prompt": text(e, "prompt"), "params": text(e, "params"), "seed": int(e.get_attribute("data-seed")),
             "src": e.find_element("tag name", "img").get_attribute("src")}
            for e in browser.find_elements("css selector", "#gallery .entry")]


def pixels(src: str):
    """A data: URL's image as an int tensor [H, W, 3]."""
    import io

    import numpy as np
    import torch
    from PIL import Image

    image = Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1]))).convert("RGB")
    return torch.from_numpy(np.asarray(image).astype("int16"))


def run_and_wait(browser, button) -> None:
    """Click a gallery button that starts a request, and wait for its entry."""
    before = len(gallery(browser))
    button.click()
    wait_until(browser, lambda: len(gallery(browser)) == before + 1 and browser.find_element("id", "go").is_enabled(),
               "the request to join the gallery")


def test_generate_shows_the_images_of_the_request(server, browser):
    open_page(browser, server + "/")
    assert browser.title == "lcmserve playground"
    assert browser.find_element("id", "model").text == MODEL
    assert browser.find_element("id", "n").get_attribute("max") == "4"  # the server's max_images
    fill(browser, prompt="a blue square", steps="2", guidance="3.5", seed="42", n="3", key=API_KEY)
    generate(browser)
    assert browser.find_element("id", "error").text == ""
    assert len(figures(browser)) == 3
    captions = [f.find_element("tag name", "figcaption").text for f in figures(browser)]
    assert captions == [f"seed {s}, 2 steps, w 3.5" for s in (42, 43, 44)]
    images = browser.find_elements("css selector", "#grid img")
    sizes = [browser.execute_script("return [arguments[0].complete, arguments[0].naturalWidth]", i) for i in images]
    assert sizes == [[True, 64]] * 3  # the browser decoded each PNG
    assert "3 image(s) in" in browser.find_element("id", "status").text
    # the page streamed the request: a preview per denoising step came in before the images
    assert browser.find_element("id", "grid").get_attribute("data-previews") == "2"
    # the page sent what was typed: the same request by hand gives the same PNGs
    by_hand = httpx.post(server + "/generate", timeout=60, headers={"Authorization": f"Bearer {API_KEY}"},
                         json={"prompt": "a blue square", "steps": 2, "guidance_scale": 3.5, "seed": 42,
                               "num_images": 3}).json()
    assert [i.get_attribute("src") for i in images] == [
        "data:image/png;base64," + image["b64"] for image in by_hand["images"]]
    assert base64.b64decode(by_hand["images"][0]["b64"]).startswith(b"\x89PNG")
    # a new request replaces the grid; the gallery keeps both, newest first
    fill(browser, n="1", seed="7")
    generate(browser)
    assert [f.find_element("tag name", "figcaption").text for f in figures(browser)] == ["seed 7, 2 steps, w 3.5"]
    assert [(e["prompt"], e["params"]) for e in gallery(browser)] == [
        ("a blue square", f"seed {s}, 2 steps, w 3.5") for s in (7, 42, 43, 44)]


def test_errors_are_shown_to_the_user(server, browser):
    open_page(browser, server + "/")
    error = browser.find_element("id", "error")
    # 1. a wrong API key: the server's 401, type and message
    fill(browser, prompt="a red circle", steps="1", key="wrong")
    generate(browser)
    assert error.is_displayed() and error.text.startswith("401 unauthorized: missing or wrong API key")
    assert figures(browser) == []
    # 2. a value the server refuses: its message names the field and the limit
    fill(browser, prompt="x" * (MAX_PROMPT_CHARS + 1), key=API_KEY)
    generate(browser)
    assert error.text == (f"422 invalid_request: prompt has {MAX_PROMPT_CHARS + 1} characters; "
                          f"at most max_prompt_chars={MAX_PROMPT_CHARS}")
    assert figures(browser) == []
    # 3. out of the form's own range: the browser refuses to send it and says why
    fill(browser, prompt="a red circle", steps="9")
    browser.find_element("id", "go").click()
    steps = browser.find_element("id", "steps")
    assert browser.execute_script("return arguments[0].validity.rangeOverflow", steps)
    assert steps.get_attribute("validationMessage")
    assert browser.find_element("id", "status").text == ""  # nothing was sent
    assert gallery(browser) == []
    # 4. fixed, the same form succeeds and the error goes away
    fill(browser, steps="1")
    generate(browser)
    assert error.text == "" and not error.is_displayed()
    assert len(figures(browser)) == 1 and len(gallery(browser)) == 1
    # 5. an error of a request run again from the gallery shows in the same place; the gallery stays
    fill(browser, key="wrong")
    browser.find_element("css selector", "#gallery button.vary").click()
    wait_until(browser, lambda: error.text.startswith("401 unauthorized"), "the refused request's error")
    assert len(gallery(browser)) == 1


def test_the_gallery_runs_an_image_again_and_varies_its_seed(server, browser):
    open_page(browser, server + "/")
    examples = [b.text for b in browser.find_elements("css selector", "button.example")]
    fill(browser, key=API_KEY, n="1", seed="11")
    for i, example in enumerate(examples[1:]):  # a bundled model's examples fill the prompt when clicked
        browser.find_element("xpath", f"//button[@class='example' and text()='{example}']").click()
        assert browser.find_element("id", "prompt").get_attribute("value") == example
        fill(browser, seed=str(11 + i))
        generate(browser)
    prompt = examples[0] if examples else "a green circle"
    fill(browser, prompt=prompt, steps="3", seed="42", n="2")
    generate(browser)
    made = gallery(browser)
    assert [(e["prompt"], e["seed"]) for e in made[:2]] == [(prompt, 42), (prompt, 43)]
    assert len(made) == 2 + len(examples[1:])
    # 1. click an image: the same request again, alone: the same seed and the same picture
    run_and_wait(browser, browser.find_elements("css selector", "#gallery button.rerun")[1])
    again = gallery(browser)[0]
    assert {**again, "src": None} == {**made[1], "src": None}
    # alone, not in a batch of two: the same picture within float rounding
    assert (pixels(again["src"]) - pixels(made[1]["src"])).abs().max() <= 2
    assert browser.find_element("id", "seed").get_attribute("value") == "43"  # the form shows what ran
    # 2. vary its seed: the same prompt and parameters, a new seed
    run_and_wait(browser, browser.find_elements("css selector", "#gallery button.vary")[0])
    varied = gallery(browser)[0]
    assert varied["prompt"] == prompt and varied["seed"] != 43
    assert varied["params"] == f"seed {varied['seed']}, 3 steps, w {again['params'].rsplit('w ', 1)[1]}"
    assert len(gallery(browser)) == len(made) + 2
    screenshot(browser)


def test_the_model_card_shows_the_model_and_its_backend(server, browser):
    open_page(browser, server + "/")
    card = browser.find_element("id", "card")
    # GET /v1/models takes the key: the card says so, and fills once the key is typed
    wait_until(browser, lambda: "API key" in browser.find_element("id", "card-status").text, "the card to ask")
    fill(browser, key=API_KEY)
    browser.find_element("id", "prompt").click()  # leaving the field sends its change
    wait_until(browser, lambda: card.get_attribute("data-loaded") == "true", "the model card")
    info = httpx.get(server + "/v1/models", headers={"Authorization": f"Bearer {API_KEY}"}, timeout=10).json()
    info = info["data"][0]
    assert browser.find_element("id", "model").text == info["id"] == MODEL
    assert browser.find_element("id", "card-size").text == f"{info['native_size']} x {info['native_size']} px"
    assert browser.find_element("id", "card-tokens").text.startswith(f"up to {info['max_prompt_tokens']} tokens")
    assert browser.find_element("id", "card-backend").text == "torch, float32, sdpa attention"
    assert float(browser.find_element("id", "card-guidance").text) == info["default_guidance_scale"]
    assert browser.find_element("id", "card-mode").text.startswith("embedding")
    if MODEL == "preset:tiny-sd":  # a model without a prompt guide: its id alone, no examples
        assert browser.find_elements("id", "understands") == [] and browser.find_elements("id", "examples") == []
    else:
        assert "background" in browser.find_element("id", "understands").text


def screenshot(browser) -> None:
    """The whole page as a PNG at $LCMSERVE_SCREENSHOT, when it is set."""
    path = os.environ.get("LCMSERVE_SCREENSHOT")
    if not path:
        return
    width, height = browser.execute_script(
        "return [document.documentElement.scrollWidth, document.documentElement.scrollHeight]")
    shot = browser.execute_cdp_cmd("Page.captureScreenshot", {
        "format": "png", "captureBeyondViewport": True,
        "clip": {"x": 0, "y": 0, "width": width, "height": height, "scale": 1}})
    with open(path, "wb") as f:
        f.write(base64.b64decode(shot["data"]))


def test_a_classifier_free_guidance_model_gets_a_negative_prompt_field(base_sd_dir, lora_sd_dir, browser, server,
                                                                        tmp_path):
    """A base model with an LCM-LoRA takes a negative prompt: the page offers the field and sends it."""
    open_page(browser, server + "/")
    assert browser.find_elements("id", "negative") == []  # a distilled LCM has no negative branch
    assert browser.find_element("id", "guidance").get_attribute("value") == "8"
    flags = ("--model", str(base_sd_dir), "--lora", str(lora_sd_dir), "--device", "cpu", "--warmup-steps", "",
             "--max-queue-delay-ms", "5")
    with local_server(*flags, log_path=tmp_path / "server.log") as url:
        open_page(browser, url + "/")
        assert browser.find_element("id", "guidance").get_attribute("value") == "1"  # an LCM-LoRA's default
        fill(browser, prompt="a cat", negative="a dog", steps="2", guidance="4", seed="5", n="1")
        generate(browser)
        assert browser.find_element("id", "error").text == ""
        src = browser.find_element("css selector", "#grid img").get_attribute("src")
        ask = {"prompt": "a cat", "steps": 2, "guidance_scale": 4.0, "seed": 5}
        with_negative = httpx.post(url + "/generate", timeout=60, json={**ask, "negative_prompt": "a dog"}).json()
        plain = httpx.post(url + "/generate", timeout=60, json=ask).json()
        card = httpx.get(url + "/v1/models", timeout=10).json()["data"][0]
    assert (card["id"], card["lora"], card["guidance_mode"]) == (str(base_sd_dir), str(lora_sd_dir), "cfg")
    assert src == "data:image/png;base64," + with_negative["images"][0]["b64"]
    assert with_negative["images"][0]["b64"] != plain["images"][0]["b64"]


def test_the_adapter_picker_sends_the_chosen_adapter(lcm_sd_dir, browser, tmp_path):
    """A server with an adapter: the page offers it (from the model card) and sends it with its scale."""
    from selenium.webdriver.support.ui import Select

    from conftest import make_lora

    lora = make_lora(lcm_sd_dir, tmp_path / "ink", seed=21)
    flags = ("--model", str(lcm_sd_dir), "--adapter", f"ink={lora}", "--device", "cpu", "--warmup-steps", "",
             "--max-queue-delay-ms", "5")
    with local_server(*flags, log_path=tmp_path / "server.log") as url:
        open_page(browser, url + "/")
        wait_until(browser, lambda: browser.find_element("id", "adapter-field").is_displayed(), "the adapter picker")
        Select(browser.find_element("id", "adapter")).select_by_value("ink")
        fill(browser, prompt="a cat", steps="2", guidance="8", seed="5", n="1", **{"adapter-scale": "2"})
        generate(browser)
        assert browser.find_element("id", "error").text == ""
        src = browser.find_element("css selector", "#grid img").get_attribute("src")
        assert gallery(browser)[0]["params"].endswith(", ink 2")
        ask = {"prompt": "a cat", "steps": 2, "guidance_scale": 8.0, "seed": 5}
        styled = httpx.post(url + "/generate", timeout=60, json={**ask, "adapters": {"ink": 2.0}}).json()
        plain = httpx.post(url + "/generate", timeout=60, json=ask).json()
    assert src == "data:image/png;base64," + styled["images"][0]["b64"]
    assert styled["images"][0]["b64"] != plain["images"][0]["b64"]
