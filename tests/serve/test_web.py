"""The web page in headless Chromium (Debian's, driven by Playwright): it loads, streams previews
while generating, shows the result, and inpaints what the brush painted."""

from __future__ import annotations

import base64
import io
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from serve_helpers import TEST_ARGS, assert_same_image, pil_array, png_array

from muse.data.images import TRANSPARENT_BELOW

REPO = Path(__file__).resolve().parents[2]
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def _chromium() -> str:
    """The system Chromium, installed by scripts/install_browser.sh when missing (never a download
    of Playwright's own build); skip only when it truly cannot be installed."""
    path = shutil.which("chromium")
    if path is None:
        done = subprocess.run(["bash", str(REPO / "scripts" / "install_browser.sh")], capture_output=True, text=True,
                              timeout=900)
        path = shutil.which("chromium")
        if path is None:
            pytest.skip(f"chromium is not installed and scripts/install_browser.sh could not install it: "
                        f"{(done.stderr or done.stdout).strip()[-300:]}")
    return path


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    playwright = pytest.importorskip("playwright.sync_api")
    executable = _chromium()
    profile = tmp_path_factory.mktemp("chromium-profile")
    with playwright.sync_playwright() as p:
        context = p.chromium.launch_persistent_context(str(profile), executable_path=executable, headless=True,
                                                       args=CHROMIUM_ARGS)
        yield context
        context.close()


# Keeps the files of each form the page posts to /v1/images/edits, as data URLs, in window.sentEdits.
RECORD_EDITS = """() => { const fetch0 = window.fetch; window.sentEdits = [];
    const dataUrl = (blob) => new Promise((done) => { const r = new FileReader(); r.onload = () => done(r.result);
                                                      r.readAsDataURL(blob); });
    window.fetch = async (url, init) => {
        if (String(url).includes('images/edits')) window.sentEdits.push(
            {image: await dataUrl(init.body.get('image')), mask: await dataUrl(init.body.get('mask')),
             keep_pixels: init.body.get('keep_pixels')});
        return fetch0(url, init); }; }"""


def _data_url_image(url: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1])))


def test_page_generates_with_live_previews_and_inpaints(muse_app, pipe, browser):
    page = browser.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    previews: list[str] = []
    page.expose_function("recordPreview", lambda text: previews.append(text))
    page.goto(muse_app.url + "/")
    assert page.title() == "Muse on Ray"
    # The API needs the key here: the page says so, then works once it is entered.
    page.wait_for_function("document.getElementById('status').textContent.includes('401')")
    page.fill("#apikey", muse_app.key)
    page.dispatch_event("#apikey", "change")
    page.wait_for_function("document.querySelectorAll('#size option').length === 5")
    page.select_option("#size", "128x128")
    page.fill("#seed", "5")
    page.fill("#prompt", "a red circle on a blue background")
    # Record every progress line the stream produces.
    page.evaluate("""new MutationObserver((records) => records.forEach((r) =>
            r.addedNodes.forEach((n) => window.recordPreview(n.textContent))))
        .observe(document.getElementById('progress'), {childList: true})""")
    page.click("#generate")
    page.wait_for_function("document.getElementById('status').textContent.startsWith('done')", timeout=120_000)
    assert page.text_content("#status") == "done (seed 5)"  # the seed the server used, from the stream
    assert any("base step" in p for p in previews) and any("superres step" in p for p in previews), previews
    assert page.eval_on_selector("#result", "img => img.src.startsWith('data:image/png;base64,')")
    page.wait_for_function("document.getElementById('result').naturalWidth === 128")
    result_before = page.eval_on_selector("#result", "img => img.src")

    # Paint a stroke over the top-left of the result and inpaint it.
    page.wait_for_function("document.getElementById('brush').width === 128")
    box = page.locator("#brush").bounding_box()
    page.mouse.move(box["x"] + 5, box["y"] + 5)
    page.mouse.down()
    page.mouse.move(box["x"] + box["width"] * 0.4, box["y"] + box["height"] * 0.3, steps=8)
    page.mouse.up()
    assert page.is_enabled("#inpaint")
    page.evaluate(RECORD_EDITS)
    page.click("#inpaint")
    page.wait_for_function("['inpainted'].includes(document.getElementById('status').textContent) || "
                           "document.getElementById('status').className === 'error'", timeout=120_000)
    assert page.text_content("#status") == "inpainted", page.text_content("#status")
    result_after = page.eval_on_selector("#result", "img => img.src")
    assert result_after.startswith("data:image/png;base64,") and result_after != result_before
    [sent] = page.evaluate("window.sentEdits")
    assert not errors, errors
    page.close()

    # The page sent the result shown and a mask that is transparent (regenerate) where the brush went only.
    image = _data_url_image(sent["image"]).convert("RGB")
    assert_same_image(pil_array(image), png_array(result_before.split(",", 1)[1]))
    alpha = np.asarray(_data_url_image(sent["mask"]).convert("RGBA"))[..., 3]
    assert alpha.shape == (128, 128)
    scale = 128 / box["width"]  # canvas pixels per CSS pixel
    start, end = np.array([5 * scale, 5 * scale]), np.array([0.4 * 128, 0.3 * 128])  # (x, y)
    for k in (0, 4, 8):  # the stroke's ends and middle (the mouse moved there in 8 steps)
        x, y = (start + k / 8 * (end - start)).astype(int)
        assert alpha[y, x] == 0, (k, x, y)
    assert (alpha[48:, :] == 255).all() and (alpha[:, 60:] == 255).all()  # away from the stroke: kept
    # What the page shows is that inpainting, as the one-process pipeline does it, keeping the unpainted
    # pixels as the page does unless its box is cleared.
    assert sent["keep_pixels"] == "true"
    want = pipe.inpaint(image, alpha < TRANSPARENT_BELOW, "a red circle on a blue background", steps=TEST_ARGS["sampling"]["steps"],
                        superres_steps=TEST_ARGS["sampling"]["superres_steps"], seed=5, keep_pixels=True)
    assert_same_image(png_array(result_after.split(",", 1)[1]), pil_array(want[0]))


def test_editor_before_and_after_an_image_layout_touch_and_no_blank_inpaint(muse_app, browser):
    """The brush controls stay clickable before any image exists, painting a blank editor sends
    nothing, and a touch pointer paints (the brush canvas does not scroll the page)."""
    page = browser.new_page()
    errors = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(muse_app.url + "/")
    for control in ("#brushsize", "#keeppixels", "#clear", "#inpaint"):  # not covered by the editor's canvases
        hit = page.evaluate("""(sel) => { document.querySelector(sel).scrollIntoView({block: 'center'});
            const r = document.querySelector(sel).getBoundingClientRect();
            const el = document.elementFromPoint(r.left + r.width / 2, r.top + r.height / 2);
            return el && el.closest(sel) !== null; }""", control)
        assert hit, f"{control} is covered"
    assert page.eval_on_selector("#brush", "c => getComputedStyle(c).touchAction") == "none"
    box = page.locator("#brush").bounding_box()
    page.mouse.move(box["x"] + 10, box["y"] + 10)
    page.mouse.down()
    page.mouse.move(box["x"] + 40, box["y"] + 40, steps=4)
    page.mouse.up()
    assert not page.is_enabled("#inpaint")  # a blank canvas is never inpainted

    # With an image in the editor (any PNG: the editor takes what the result pane shows), touch paints.
    page.evaluate("""() => { const c = document.createElement('canvas'); c.width = c.height = 64;
        c.getContext('2d').fillRect(0, 0, 64, 64); loadEditor(c.toDataURL('image/png')); }""")
    page.wait_for_function("document.getElementById('brush').width === 64")
    page.evaluate("""() => { const b = document.getElementById('brush'), r = b.getBoundingClientRect();
        const at = (type, f) => b.dispatchEvent(new PointerEvent(type, { pointerType: 'touch', pointerId: 7,
            isPrimary: true, bubbles: true, clientX: r.left + r.width * f, clientY: r.top + r.height * f }));
        at('pointerdown', 0.3); at('pointermove', 0.5); window.dispatchEvent(new PointerEvent('pointerup')); }""")
    assert page.is_enabled("#inpaint")
    painted = page.evaluate("""() => { const b = document.getElementById('brush');
        const d = b.getContext('2d').getImageData(0, 0, b.width, b.height).data;
        let n = 0; for (let i = 3; i < d.length; i += 4) n += d[i] > 0; return n; }""")
    assert painted > 20
    assert not errors, errors
    page.close()
