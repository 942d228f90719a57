"""The click-a-point page in real headless Chromium (Debian's chromium + chromium-driver, Selenium).

Starts the real app with the tiny bundle on 127.0.0.1, loads ``/``, uploads an image, clicks two
points and checks that a similarity map appears over the image and differs between the clicks,
that a second image gives cross-image maps and a matches drawing, that touch taps work, that the
layout fits a phone-sized window, and that an API error is shown with the server's own message.

The click -> map-on-screen latency the page measures (``performance.now()`` around the request and
the map's decode, exposed as ``<body data-latency-ms>``) is printed; run with ``-s`` to see it.
``LIFT_PAGE_SCREENSHOT=docs/page.png`` also saves a screenshot of the page after a click (how the
README's screenshot is made). Nothing is installed or downloaded here: without Chromium the test
is skipped with the reason (``scripts/test.sh`` installs it when run as root, as CI does).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import statistics
import tempfile
from pathlib import Path

import httpx
import numpy as np
import pytest
from live_server import live_server
from PIL import Image

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
WAIT_S = 20


def _chromium_missing() -> str | None:
    for path in (CHROMIUM, CHROMEDRIVER):
        if not os.access(path, os.X_OK):
            return f"{path} is missing: apt-get install chromium chromium-driver (scripts/test.sh does, as root)"
    return None


@pytest.fixture(scope="module")
def server_url(tiny_bundle):
    from lift_serve.service.app import create_app
    from lift_serve.service.settings import Settings

    app = create_app(Settings(bundle=tiny_bundle, providers="cpu", max_wait_ms=1))
    with live_server(app) as url:
        yield url


@pytest.fixture(scope="module")
def browser():
    reason = _chromium_missing()
    if reason:
        print(f"SKIP browser test: {reason}")
        pytest.skip(reason)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    profile = tempfile.mkdtemp(prefix="lift-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-quic", "--no-first-run", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", f"--user-data-dir={profile}", "--window-size=1280,860"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def _wait(driver, condition, message: str):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, WAIT_S, poll_frequency=0.02).until(lambda d: condition(d), message)


def _picture(height: int, width: int, seed: int) -> np.ndarray:
    """uint8 [H, W, 3] with smooth gradients and flat shapes, so different points differ."""
    from lift_serve.model.export import natural_image

    return natural_image(height, width, seed=seed)


def _save_png(array: np.ndarray, path: Path) -> Path:
    Image.fromarray(array).save(path)
    return path


def _maps(driver) -> int:
    return int(driver.find_element("tag name", "body").get_attribute("data-maps") or 0)


def _heat_pixels(driver, slot: str) -> str:
    """The heat map as the page shows it, read back through a canvas (a data: URL)."""
    return driver.execute_script(
        """
        const img = document.getElementById(arguments[0]);
        const c = document.createElement('canvas');
        c.width = img.naturalWidth; c.height = img.naturalHeight;
        c.getContext('2d').drawImage(img, 0, 0);
        return c.toDataURL('image/png');
        """,
        f"heat-{slot}",
    )


def _click(driver, element, fx: float, fy: float) -> None:
    """Mouse click at a fraction (fx, fy) of ``element``'s box (Selenium offsets are from its centre)."""
    from selenium.webdriver.common.action_chains import ActionChains

    rect = element.rect
    ActionChains(driver).move_to_element_with_offset(
        element, int((fx - 0.5) * rect["width"]), int((fy - 0.5) * rect["height"])
    ).click().perform()


def _click_and_wait(driver, element, fx: float, fy: float) -> float:
    before = _maps(driver)
    _click(driver, element, fx, fy)
    _wait(driver, lambda d: _maps(d) > before and d.find_element("tag name", "body").get_attribute(
        "data-state") == "idle", "no similarity map appeared after the click")
    return float(driver.find_element("tag name", "body").get_attribute("data-latency-ms"))


def _server_message(url: str, data: bytes) -> str:
    response = httpx.post(f"{url}/v1/features", files={"image": ("notes.png", data, "image/png")})
    assert response.status_code >= 400
    return response.json()["error"]["message"]


def _page_with_image(driver, url: str, window: tuple[int, int], image: Path):
    """Load the page in a ``window``-sized window, upload ``image`` as image A and return its stage once shown."""
    driver.set_window_size(*window)
    driver.get(url + "/")
    _wait(driver, lambda d: d.find_element("tag name", "body").get_attribute("data-state") == "idle",
          "the page did not load")
    driver.find_element("id", "file-a").send_keys(str(image))
    stage = driver.find_element("id", "stage-a")
    _wait(driver, lambda d: "empty" not in stage.get_attribute("class"), "the uploaded image was not shown")
    return stage


def test_click_a_point_page(server_url, browser, tmp_path):
    from selenium.webdriver.support.ui import Select

    driver = browser
    driver.set_window_size(1280, 860)
    driver.get(server_url + "/")
    _wait(driver, lambda d: d.find_element("id", "iterations").find_elements("tag name", "option"),
          "the page did not list the LiFT iterations from /v1/models")
    assert "LiFT" in driver.title
    # Not a demo bundle, but its weights are random: the banner says so.
    banner = driver.find_element("id", "demo-warning")
    assert banner.get_attribute("hidden") is None and "UNTRAINED WEIGHTS" in banner.text
    offered = [o.get_attribute("value") for o in driver.find_element("id", "iterations")
               .find_elements("tag name", "option")]
    assert offered == ["0", "1"]
    # A patch-14 bundle's steps pass one pixel a cell (14 -> 0.875): the page adds stride 1.
    strides = {"0": 14, "1": 7, "2": 3.5, "3": 1.75, "4": 0.875}
    patch14 = {"model": {"strides": strides}, "parameters": {"iterations": {"allowed": [0, 1, 2, 3, 4], "default": 4}}}
    choices = driver.execute_script("return densityChoices(arguments[0]).choices", patch14)
    assert [c["value"] for c in choices] == ["0", "1", "2", "3", "4", "s1"]
    assert choices[-1]["params"] == {"stride": 1} and choices[4]["params"] == {"iterations": 4}
    assert "0.875 px" in choices[4]["label"]
    patch16 = {"model": {"strides": {str(k): 16 / 2**k for k in range(5)}},
               "parameters": {"iterations": {"allowed": [0, 1, 2, 3, 4], "default": 4}}}
    assert len(driver.execute_script("return densityChoices(arguments[0]).choices", patch16)) == 5

    # Upload an image; it is sent once and shown.
    a = _save_png(_picture(120, 160, seed=1), tmp_path / "a.png")
    driver.find_element("id", "file-a").send_keys(str(a))
    stage = driver.find_element("id", "stage-a")
    _wait(driver, lambda d: "empty" not in stage.get_attribute("class"), "the uploaded image was not shown")
    assert "160×120" in driver.find_element("id", "caption-a").text

    # Two clicks at different points: a map appears each time, and the two maps differ.
    latencies = [_click_and_wait(driver, stage, 0.2, 0.25)]
    heat = driver.find_element("id", "heat-a")
    assert heat.is_displayed()
    assert driver.execute_script("return [arguments[0].naturalWidth, arguments[0].naturalHeight]", heat) == [160, 120]
    first = _heat_pixels(driver, "a")
    marker_first = driver.find_element("id", "marker-a").get_attribute("style")
    latencies.append(_click_and_wait(driver, stage, 0.8, 0.7))
    second = _heat_pixels(driver, "a")
    assert second != first, "the similarity map did not change between two different clicks"
    assert driver.find_element("id", "marker-a").get_attribute("style") != marker_first
    # Re-clicks reuse the cached features: a few more for a latency figure.
    for fx, fy in ((0.5, 0.5), (0.3, 0.8), (0.7, 0.2)):
        latencies.append(_click_and_wait(driver, stage, fx, fy))
    print(f"\nclick -> map latency in the browser (ms): {[round(v, 1) for v in latencies]}, "
          f"median {statistics.median(latencies):.1f}")
    assert all(0 < v < 5000 for v in latencies)

    # Opacity acts on the shown map without a new request.
    maps = _maps(driver)
    driver.execute_script("const s = document.getElementById('opacity'); s.value = 25;"
                          "s.dispatchEvent(new Event('input'));")
    assert float(heat.value_of_css_property("opacity")) == pytest.approx(0.25, abs=0.01)
    assert _maps(driver) == maps
    # The legend states the range the colours span; the absolute scale spans -1 to 1.
    assert driver.find_element("id", "legend-high").text.startswith("1.000")
    Select(driver.find_element("id", "scale")).select_by_value("absolute")
    _wait(driver, lambda d: d.find_element("id", "legend-low").text.startswith("-1.000"),
          "the absolute scale did not redraw with its range")
    Select(driver.find_element("id", "scale")).select_by_value("auto")

    shot = os.environ.get("LIFT_PAGE_SCREENSHOT")
    if shot:
        driver.execute_script("const s = document.getElementById('opacity'); s.value = 60;"
                              "s.dispatchEvent(new Event('input'));")
        _click_and_wait(driver, stage, 0.35, 0.4)
        driver.save_screenshot(shot)
        driver.find_element("id", "tab-features").click()  # and the Features view beside it
        _wait(driver, lambda d: "principal" in d.find_element("id", "heat-a").get_attribute("alt"),
              "no features picture for the screenshot")
        driver.save_screenshot(str(Path(shot).with_name(Path(shot).stem + "-features.png")))
        driver.find_element("id", "tab-similarity").click()
        _click_and_wait(driver, stage, 0.35, 0.4)  # the similarity view starts without a map

    # Iterations 0: coarser map, same point, still works, and the image is not sent again: the
    # feature id serves every density (the server keeps its backbone features).
    def uploads() -> float:
        text = httpx.get(f"{server_url}/metrics").text
        return sum(float(line.split()[-1]) for line in text.splitlines()
                   if line.startswith('lift_requests_total{endpoint="/v1/features"'))

    sent = uploads()
    before = _maps(driver)
    Select(driver.find_element("id", "iterations")).select_by_value("0")
    _wait(driver, lambda d: _maps(d) > before, "changing LiFT iterations did not redraw the map")
    assert uploads() == sent

    # The Features view: the image's features as a PCA picture at its own size, no upload.
    sent = uploads()
    driver.find_element("id", "tab-features").click()
    picture = driver.find_element("id", "heat-a")
    _wait(driver, lambda d: picture.is_displayed() and "principal" in picture.get_attribute("alt"),
          "the Features view showed no picture")
    _wait(driver, lambda d: d.execute_script("return arguments[0].naturalWidth", picture) == 160,
          "the features picture is not at the image's size")
    assert uploads() == sent
    driver.find_element("id", "tab-similarity").click()
    assert not driver.find_element("id", "heat-a").is_displayed()

    # A second image: a click on the first shows the map over the second.
    b = _save_png(_picture(96, 128, seed=2), tmp_path / "b.png")
    driver.find_element("id", "file-b").send_keys(str(b))
    stage_b = driver.find_element("id", "stage-b")
    _wait(driver, lambda d: "empty" not in stage_b.get_attribute("class"), "the second image was not shown")
    _click_and_wait(driver, stage, 0.5, 0.5)
    assert driver.find_element("id", "heat-b").is_displayed()
    assert not driver.find_element("id", "heat-a").is_displayed()
    assert driver.execute_script("return document.getElementById('heat-b').naturalWidth") == 128
    # ...with the best match marked on it, where the server's map is highest (checked by hand from its JSON).
    _wait(driver, lambda d: stage_b.get_attribute("data-best-match"), "the best match was not marked")
    best = driver.find_element("id", "marker-b")
    assert best.is_displayed() and "best" in best.get_attribute("class")
    assert driver.find_element("id", "marker-a").is_displayed()  # the clicked point stays marked
    fid_a, fid_b, point, density = driver.execute_script(
        "return [state.images.a.id, state.images.b.id, state.lastClick, state.density]")
    body = httpx.post(f"{server_url}/v1/similarity", params={"x": point["x"], "y": point["y"], "format": "json",
                                                             **density},
                      data={"feature_id": fid_a, "target_id": fid_b}).json()
    sim = np.array(body["similarity"])
    row, col = np.unravel_index(int(sim.argmax()), sim.shape)
    g = body["target"]
    expected = ((col + 0.5) * g["stride"] * 128 / g["content_size"]["width"],
                (row + 0.5) * g["stride"] * 96 / g["content_size"]["height"])
    shown = [int(v) for v in stage_b.get_attribute("data-best-match").split(",")]
    assert shown == [round(expected[0]), round(expected[1])]
    # The score under the cursor, read from the map's values.
    from selenium.webdriver.common.action_chains import ActionChains

    ActionChains(driver).move_to_element_with_offset(stage_b, 0, 0).perform()
    _wait(driver, lambda d: d.find_element("id", "hover-value").text.startswith("similarity "),
          "no score under the cursor")
    # Downloads: the PNG shown and the map's values (what the page hands the browser to save).
    driver.execute_script("window.saved = []; window.download = (url, name) => saved.push([url, name]);")
    driver.find_element("id", "download-png").click()
    driver.find_element("id", "download-npy").click()
    _wait(driver, lambda d: len(d.execute_script("return saved")) == 2, "the downloads were not offered")
    heads = driver.execute_async_script(
        "const done = arguments[arguments.length - 1];"
        "Promise.all(saved.map(([url]) => fetch(url).then((r) => r.arrayBuffer())))"
        ".then((bufs) => done(bufs.map((b) => Array.from(new Uint8Array(b).slice(0, 6)))));")
    names = [name for _, name in driver.execute_script("return saved")]
    assert names == ["similarity.png", "similarity.npy"]
    assert bytes(heads[0][:4]) == b"\x89PNG" and bytes(heads[1]) == b"\x93NUMPY"

    # Matches view: lines drawn from /v1/match.
    driver.find_element("id", "tab-matches").click()
    canvas = driver.find_element("id", "match-canvas")
    _wait(driver, lambda d: int(canvas.get_attribute("data-matches") or 0) > 0, "no matches were drawn")
    assert "matches" in driver.find_element("id", "match-info").text
    # A legend for the scores, and the lines in the server's ramp (its top is yellow: 255, 240, 40).
    _wait(driver, lambda d: d.find_element("id", "match-legend").is_displayed(), "no legend for the match scores")
    assert "(best)" in driver.find_element("id", "match-legend-high").text
    assert driver.execute_script("return scoreColour(1, 0, 1)") == "rgb(255, 240, 40)"
    assert driver.execute_script("return scoreColour(0, 0, 1)") == "rgb(20, 12, 80)"
    # The route key the page sends (X-Lift-Route): its own SHA-256 (for plain http, where browsers
    # withhold WebCrypto) equals WebCrypto's and Python's; an id's key is its digest part.
    data = bytes(range(256)) * 3 + b"lift"
    keys = driver.execute_async_script(
        "const done = arguments[arguments.length - 1], bytes = new Uint8Array(arguments[0]);"
        "(async () => { const form = new FormData(); form.append('feature_id', arguments[1]);"
        "  done([await fileRouteKey(new File([bytes], 'x.bin')), sha256Hex(bytes).slice(0, 32), await routeKey(form)]);"
        "})();", list(data), fid_a)
    assert keys == [hashlib.sha256(data).hexdigest()[:32]] * 2 + [fid_a[:32]]
    # The score of the match under the pointer (a pointer event at one match's end).
    driver.execute_script(
        "const c = document.getElementById('match-canvas'), r = c.getBoundingClientRect();"
        "const [x, y] = state.matchSpots[0].ends[0];"
        "c.dispatchEvent(new PointerEvent('pointermove', {clientX: r.left + x, clientY: r.top + y, bubbles: true}));")
    _wait(driver, lambda d: d.find_element("id", "hover-value").text.startswith("match score "),
          "no score for the match under the pointer")
    driver.find_element("id", "tab-similarity").click()

    # An API error is shown to the person, with the server's message.
    junk = b"these are my notes, not a picture"
    expected = _server_message(server_url, junk)
    bad = tmp_path / "notes.png"
    bad.write_bytes(junk)
    driver.find_element("id", "file-a").send_keys(str(bad))
    error = driver.find_element("id", "error")
    _wait(driver, lambda d: error.is_displayed(), "the API error was not shown")
    assert expected in error.text
    assert driver.execute_script("return document.getElementById('file-a').value") == ""  # input reset
    # The image already shown stays (a failed upload replaces nothing).
    assert "empty" not in stage.get_attribute("class") and "a.png" in driver.find_element("id", "caption-a").text
    # Dismissable, and the page still works afterwards.
    driver.find_element("id", "error-close").click()
    assert not error.is_displayed()
    driver.find_element("id", "file-a").send_keys(str(a))
    _wait(driver, lambda d: "empty" not in stage.get_attribute("class"), "the page did not recover")
    _click_and_wait(driver, stage, 0.4, 0.6)


def test_touch_and_a_phone_sized_window(server_url, browser, tmp_path):
    from selenium.webdriver.common.actions import interaction
    from selenium.webdriver.common.actions.action_builder import ActionBuilder
    from selenium.webdriver.common.actions.pointer_input import PointerInput

    driver = browser
    image = _save_png(_picture(200, 150, seed=3), tmp_path / "tall.png")
    stage = _page_with_image(driver, server_url, (390, 844), image)
    # Nothing wider than the phone's viewport.
    assert driver.execute_script("return document.documentElement.scrollWidth <= window.innerWidth")
    assert stage.rect["width"] <= driver.execute_script("return window.innerWidth")

    driver.execute_script("arguments[0].scrollIntoView({block: 'center'})", stage)
    rect = driver.execute_script("const r = arguments[0].getBoundingClientRect();"
                                 "return [r.left, r.top, r.width, r.height]", stage)
    before = _maps(driver)
    actions = ActionBuilder(driver, mouse=PointerInput(interaction.POINTER_TOUCH, "finger"))
    actions.pointer_action.move_to_location(int(rect[0] + rect[2] * 0.3), int(rect[1] + rect[3] * 0.3))
    actions.pointer_action.pointer_down().pause(0.05).pointer_up()
    actions.perform()
    _wait(driver, lambda d: _maps(d) > before, "a touch tap did not produce a map")
    assert driver.find_element("id", "heat-a").is_displayed()


MARKER_FRACTION = """
const img = document.getElementById('base-a'); const r = img.getBoundingClientRect();
const s = Math.min(r.width / img.naturalWidth, r.height / img.naturalHeight);
const dw = img.naturalWidth * s, dh = img.naturalHeight * s;
const m = document.getElementById('marker-a').getBoundingClientRect();
return [(m.left + m.width / 2 - r.left - (r.width - dw) / 2) / dw,
        (m.top + m.height / 2 - r.top - (r.height - dh) / 2) / dh];
"""


def test_marker_stays_on_its_point_when_the_layout_changes(server_url, browser, tmp_path):
    """A reflow without a window resize (a scrollbar or banner appearing, a narrower panel) resizes the image."""
    driver = browser
    image = _save_png(_picture(120, 160, seed=4), tmp_path / "m.png")
    stage = _page_with_image(driver, server_url, (1280, 860), image)
    _click_and_wait(driver, stage, 0.25, 0.25)
    before = driver.execute_script(MARKER_FRACTION)
    assert before == pytest.approx([0.25, 0.25], abs=0.02)
    width = stage.rect["width"]
    # Narrow enough to reflow whatever the page's height leaves the image (the weights banner takes some).
    driver.execute_script("document.querySelector('.layout').style.gridTemplateColumns = '240px 300px'")
    _wait(driver, lambda d: stage.rect["width"] < 0.8 * width, "the layout did not change")
    _wait(driver, lambda d: d.execute_script(MARKER_FRACTION) == pytest.approx(before, abs=0.01),
          f"the marker left its point after a reflow: {driver.execute_script(MARKER_FRACTION)} != {before}")


def test_a_failed_click_leaves_the_marker_on_the_shown_map(server_url, browser, tmp_path):
    driver = browser
    image = _save_png(_picture(120, 160, seed=5), tmp_path / "f.png")
    stage = _page_with_image(driver, server_url, (1280, 860), image)
    _click_and_wait(driver, stage, 0.25, 0.25)
    shown = driver.execute_script(MARKER_FRACTION)
    # The server forgets the features and refuses new work: the next click fails.
    driver.execute_script("window.fetch = () => Promise.resolve(new Response("
                          "JSON.stringify({error: {code: 'unavailable', message: 'the server is restarting'}}),"
                          "{status: 503, headers: {'Content-Type': 'application/json'}}))")
    _click(driver, stage, 0.75, 0.75)
    error = driver.find_element("id", "error")
    _wait(driver, lambda d: error.is_displayed(), "the failed click's error was not shown")
    assert "the server is restarting" in error.text
    _wait(driver, lambda d: d.execute_script(MARKER_FRACTION) == pytest.approx(shown, abs=0.01),
          "after a failed click the marker is not on the point of the map still shown")


def test_page_assets_are_served_without_a_network(server_url):
    """Everything the page loads comes from this server (no CDN)."""
    page = httpx.get(server_url + "/")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    assert "http://" not in page.text and "https://" not in page.text
    for asset in ("static/app.js", "static/app.css"):
        response = httpx.get(f"{server_url}/{asset}")
        assert response.status_code == 200, asset
        assert "http://" not in response.text and "https://" not in response.text


class NotReadyAtFirst:
    """ASGI wrapper: the first ``times`` GET /v1/models answer 503 not_ready, as while a model loads."""

    def __init__(self, app, times: int):
        self.app = app
        self.times = times

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"] == "/v1/models" and self.times > 0:
            from starlette.responses import JSONResponse

            self.times -= 1
            body = {"error": {"code": "not_ready", "message": "the model is still loading; retry shortly"}}
            return await JSONResponse(body, status_code=503, headers={"Retry-After": "1"})(scope, receive, send)
        return await self.app(scope, receive, send)


def test_page_waits_for_a_loading_model(tiny_bundle, browser):
    from lift_serve.service.app import create_app
    from lift_serve.service.settings import Settings

    app = NotReadyAtFirst(create_app(Settings(bundle=tiny_bundle, providers="cpu")), times=2)
    with live_server(app) as url:
        browser.set_window_size(1280, 860)
        browser.get(url + "/")
        _wait(browser, lambda d: "loading on the server" in d.find_element("id", "model-info").text,
              "the page did not say that the model is loading")
        _wait(browser, lambda d: d.find_element("id", "iterations").find_elements("tag name", "option"),
              "the page did not recover once the model was ready")
        assert app.times == 0
        assert not browser.find_element("id", "error").is_displayed()
        assert "vit_tiny" in browser.find_element("id", "model-info").text


def test_page_sends_the_api_key_it_is_given(tiny_bundle, browser, tmp_path):
    """With LIFT_API_KEYS the page opened as /#key=KEY keeps the key for the tab, drops it from the
    address bar, and sends it with every API call: the model list loads and a click gets its map."""
    from lift_serve.service.app import create_app
    from lift_serve.service.settings import Settings

    app = create_app(Settings(bundle=tiny_bundle, providers="cpu", max_wait_ms=1, api_keys="page-key-1"))
    with live_server(app) as url:
        assert httpx.get(f"{url}/v1/models").status_code == 401
        browser.get(url + "/#key=page-key-1")
        _wait(browser, lambda d: d.find_element("id", "iterations").find_elements("tag name", "option"),
              "the page did not list the LiFT iterations with its key")
        assert "key=" not in browser.current_url
        a = _save_png(_picture(64, 64, seed=3), tmp_path / "a.png")
        browser.find_element("id", "file-a").send_keys(str(a))
        stage = browser.find_element("id", "stage-a")
        _wait(browser, lambda d: "empty" not in stage.get_attribute("class"), "the uploaded image was not shown")
        _click_and_wait(browser, stage, 0.5, 0.5)
        browser.execute_script("sessionStorage.clear()")


def test_docs_render_without_the_internet(server_url, browser):
    """/docs is Swagger UI served by the server itself: it renders every endpoint with no network
    (the browser runs with background networking off and nothing outside 127.0.0.1 reachable)."""
    browser.get(server_url + "/docs")
    _wait(browser, lambda d: len(d.find_elements("css selector", ".opblock")) >= 5,
          "Swagger UI did not render the endpoints")
    paths = {e.text for e in browser.find_elements("css selector", ".opblock-summary-path")}
    assert {"/v1/features", "/v1/similarity", "/v1/match", "/v1/visualize"} <= paths
    # Everything the page loaded came from the server itself.
    loaded = browser.execute_script("return performance.getEntriesByType('resource').map((e) => e.name)")
    assert loaded and all(url.startswith(server_url) for url in loaded), loaded
