"""The page in a real browser: Debian's chromium, driven by Playwright, against a live server.

Installed by .ci/run (`apt-get install chromium`, `pip install playwright`; never `playwright
install`). A screenshot of the finished page goes to $FLUX_TEST_ARTIFACTS (default test-artifacts/).
"""

from __future__ import annotations

import io
import os
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytestmark = pytest.mark.e2e  # starts a server and a browser

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ARTIFACTS = Path(os.environ.get("FLUX_TEST_ARTIFACTS", "test-artifacts"))
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", "--no-first-run", "--disable-default-apps"]


@pytest.fixture(scope="module")
def ui_server(server):
    """The session's server: latent previews, the LoRA folder."""
    return server


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    if not Path(CHROMIUM).is_file():
        pytest.fail(f"chromium is not installed at {CHROMIUM}: apt-get install chromium (.ci/run does)")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=ARGS)
        yield browser
        browser.close()


@pytest.fixture()
def page(browser, ui_server):
    """A fresh page that records every URL it asks for."""
    context = browser.new_context(viewport={"width": 1100, "height": 1400})
    page = context.new_page()
    page.requested = []
    page.on("request", lambda request: page.requested.append(request.url))
    page.goto(ui_server.url)
    page.get_by_placeholder("Enter your prompt").wait_for(timeout=60_000)
    yield page
    context.close()


def watch_result(page, ui_server, *, size: tuple[int, int], timeout: float = 900, box: str = "#result"):
    """Follow the image in `box` until the full-size one arrives; return (every image seen, the final).
    `timeout` only guards against a hang: a busy machine may take minutes."""
    seen, deadline = {}, time.monotonic() + timeout
    while time.monotonic() < deadline:
        image = page.locator(f"{box} img")
        if image.count():
            src = image.first.get_attribute("src")
            if src and src not in seen:
                body = page.request.get(src).body()
                seen[src] = Image.open(io.BytesIO(body)).convert("RGB")
                if seen[src].size == size:
                    return list(seen.values()), seen[src]
        time.sleep(0.05)
    raise AssertionError(f"no {size} image within {timeout} s; saw {[i.size for i in seen.values()]}")


def set_slider(page, label: str, value: str) -> None:
    """Type into a slider's number box, leave it, and wait until the slider itself has the value.

    The box can take the text before the page has wired it up (a just-opened accordion on a busy
    machine), so the typing is repeated until the slider follows.
    """
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    box = page.get_by_label(f"number input for {label}")
    box.wait_for(state="visible")
    for attempt in range(3):
        box.fill(value)
        box.press("Tab")
        try:
            page.wait_for_function("([label, value]) => document.querySelector("
                                   "`[aria-label=\"range slider for ${label}\"]`).value === value",
                                   arg=[label, value], timeout=60_000)
            return
        except PlaywrightTimeout:
            if attempt == 2:
                raise


def test_prompt_enter_previews_then_the_image(page, ui_server):
    page.get_by_placeholder("Enter your prompt").fill("a lighthouse on a cliff")
    page.get_by_placeholder("Enter your prompt").press("Enter")
    # A middle step (the fifth preview of 28): the preview fills the result box.
    page.wait_for_function("""() => {
        const src = document.querySelector('#result img')?.getAttribute('src');
        if (src && src !== window.lastPreview) { window.lastPreview = src; window.previews = (window.previews || 0) + 1; }
        return window.previews >= 5;
    }""", timeout=300_000, polling=20)
    # While previews stream, the line under the image says which step they are at.
    page.wait_for_function("/^Step \\d+ of 28$/.test(document.querySelector('#steps').innerText.trim())",
                           timeout=300_000, polling=20)
    middle = page.locator("#result img").first.bounding_box()
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "preview-middle.png"))
    images, final = watch_result(page, ui_server, size=(1024, 1024))
    page.wait_for_function("document.querySelector('#steps').innerText.trim() === ''")  # gone at the end
    previews = [image for image in images if image.size == (128, 128)]  # latent previews: 1/8 size
    assert len(previews) >= 2, [image.size for image in images]
    assert final.size == (1024, 1024)
    end = page.locator("#result img").first.bounding_box()
    page.screenshot(path=str(ARTIFACTS / "preview-end.png"))
    # Shown at the box's width (128 px scaled up), the preview takes the final image's place exactly:
    # nothing jumps when the image arrives.
    assert middle["width"] > 4 * 128 - 20 and (middle["width"], middle["height"]) == (end["width"], end["height"]), (
        middle, end)


def test_advanced_settings_seed_and_no_randomize(page, ui_server):
    page.get_by_placeholder("Enter your prompt").fill("a seeded fox")
    page.get_by_text("Advanced Settings").click()
    for label, value in [("Seed", "1234"), ("Width", "512"), ("Height", "384"), ("Number of inference steps", "6")]:
        set_slider(page, label, value)
    page.get_by_label("Randomize seed").uncheck()
    page.get_by_role("button", name="Run").click()
    _, final = watch_result(page, ui_server, size=(512, 384))
    page.wait_for_function("document.querySelector('[aria-label=\"number input for Seed\"]').value === '1234'")
    # The page's image is the one the API gives for the same settings.
    path, seed = ui_server.client().predict("a seeded fox", 1234, False, 512, 384, 3.5, 6, api_name="/infer")
    assert seed == 1234
    np.testing.assert_array_equal(np.asarray(final), np.asarray(Image.open(path).convert("RGB")))
    # The session's gallery shows what was made: the result's own file, not a re-encoded copy.
    page.locator("#history img").first.wait_for(timeout=300_000)
    result_src = page.locator("#result img").first.get_attribute("src")
    assert page.locator("#history img").first.get_attribute("src") == result_src, result_src
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "ui.png"), full_page=True)
    assert (ARTIFACTS / "ui.png").stat().st_size > 10_000


def test_the_page_loads_nothing_from_outside(page, ui_server):
    # Gradio keeps an event stream open, so "network idle" never comes: wait for the whole page.
    page.wait_for_load_state("load")
    page.get_by_text("an anime illustration of a wiener schnitzel").wait_for()
    page.wait_for_function("document.fonts.status === 'loaded'")  # fonts are what a page fetches last
    outside = [url for url in page.requested
               if not url.startswith((ui_server.url, "data:", "blob:", "about:"))]
    assert page.requested and not outside, outside


def test_the_lora_picker_drives_the_same_path(page, ui_server, tiny_dir, lora_dir):
    """A LoRA picked on the page (kept for this browser session, not an API parameter) gives the
    image of a server started with it fused."""
    from test_loras import fused

    page.get_by_placeholder("Enter your prompt").fill("a lora fox")
    page.get_by_text("Advanced Settings").click()
    for label, value in [("Seed", "5"), ("Width", "256"), ("Height", "256"), ("Number of inference steps", "3")]:
        set_slider(page, label, value)
    page.get_by_label("Randomize seed").uncheck()
    page.get_by_text("LoRAs", exact=True).first.click()
    page.locator("#loras input").click()
    page.get_by_role("option", name="film").click()
    page.locator("#loras").get_by_text("film").first.wait_for()
    set_slider(page, "LoRA scale", "0.8")
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "lora-picker.png"), full_page=True)
    page.get_by_role("button", name="Run").click()
    _, final = watch_result(page, ui_server, size=(256, 256))
    expected = fused(tiny_dir, lora_dir, ("film", 0.8))
    assert np.abs(np.asarray(final).astype(np.int16) - expected).max() <= 2
    # Another session (a gradio_client script) has no LoRA picked: the base model's image.
    path, _ = ui_server.client().predict("a lora fox", 5, False, 256, 256, 3.5, 3, api_name="/infer")
    np.testing.assert_array_equal(np.asarray(Image.open(path).convert("RGB")).astype(np.int16), fused(tiny_dir, lora_dir))


def test_the_edit_tab_repaints_what_was_brushed(page, ui_server, tmp_path):
    """Upload a picture, brush over its left side, edit: previews stream into the Edit tab's result,
    then the image, made by the inpainting pipeline; the API still lists /infer alone."""
    from test_edits import picture

    picture(6, size=(1024, 768)).save(tmp_path / "in.png")  # big enough that each step takes a while here
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.get_by_role("tab", name="Edit").click()
    # The upload goes in once the tab has drawn its editor (its "Upload an image" prompt and its
    # canvas showing); the canvas is there before the picture is on it, so the stroke waits for the
    # prompt to go. A GPU-less chromium under load once kept the prompt for 120 s after the file was
    # set (the picture never reached the editor): the file is set again while the prompt stays.
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    prompt = page.locator("#editor").get_by_text("Upload an image")
    prompt.wait_for(state="visible")
    canvas = page.locator("#editor canvas").first
    canvas.wait_for(state="attached")
    # The label says what painting does: all of it readable, left of the editor's toolbar, not under it.
    label, toolbar = page.locator("#editor [data-testid=block-label]"), page.locator("#editor .icon-button-wrapper")
    assert label.bounding_box()["x"] + label.bounding_box()["width"] <= toolbar.first.bounding_box()["x"], \
        f"the toolbar covers the end of the label {label.inner_text()!r}"
    for attempt in range(3):
        page.locator("#editor input[type=file]").set_input_files(str(tmp_path / "in.png"))
        try:
            prompt.wait_for(state="hidden", timeout=60_000)
            break
        except PlaywrightTimeout:
            page.screenshot(path=str(ARTIFACTS / f"edit-upload-{attempt}.png"))
    else:
        pytest.fail("the editor kept its upload prompt after the picture was set three times (screenshots: "
                    f"{ARTIFACTS}/edit-upload-*.png)")
    box = canvas.bounding_box()
    page.mouse.move(box["x"] + box["width"] * 0.2, box["y"] + box["height"] * 0.2)
    page.mouse.down()
    # A few pointer moves make the stroke (each redraws the canvas: slow in a GPU-less browser).
    for fraction in (0.4, 0.6, 0.8):
        page.mouse.move(box["x"] + box["width"] * 0.25, box["y"] + box["height"] * fraction)
    page.mouse.up()
    page.locator("#edit-prompt textarea, #edit-prompt input").first.fill("a fox in the snow")
    page.screenshot(path=str(ARTIFACTS / "edit-brushed.png"))
    before = ui_server.log().count("(inpaint)")
    page.locator("#edit-run").click()
    page.wait_for_function("/^Step \\d+ of \\d+$/.test(document.querySelector('#edit-steps').innerText.trim())",
                           timeout=300_000, polling=20)
    images, _ = watch_result(page, ui_server, size=(1024, 768), box="#edit-result")
    assert (128, 96) in [image.size for image in images], [image.size for image in images]  # latent previews
    page.screenshot(path=str(ARTIFACTS / "edit-end.png"))
    assert ui_server.log().count("(inpaint)") == before + 1  # the brushed mask made it an inpainting
    assert [name for name in ui_server.client().view_api(print_info=False, return_format="dict")["named_endpoints"]] \
        == ["/infer"]
