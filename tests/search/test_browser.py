"""`leccr serve` on a free loopback port, driven in a real headless Chromium: a German query typed and
submitted, result cards in the API's order with their pictures loaded, a click shows the captions and
where the description comes from; the k control; a Chinese query whose captions are in the DOM and
drawn as glyphs in a screenshot (not as the boxes a machine without a CJK font shows); the address holds
each search (back and forward show it again; an address opened anew shows its search).

Needs Chromium, its driver and a CJK font (`apt-get install chromium chromium-driver fonts-wqy-zenhei`)
and Selenium (the `test` extra); skipped with the reason printed where any of them is missing."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from tests.search.conftest import skip_loudly

REPO = Path(__file__).parents[2]
BROWSER_FLAGS = (
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--window-size=1280,1000",
)


def _browser_or_skip(request) -> tuple[str, str]:
    try:
        import selenium  # noqa: F401
    except ImportError:
        skip_loudly(request, "selenium is not installed (pip install 'leccr[test]')")
    browser = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    driver = shutil.which("chromedriver")
    if not browser or not driver:
        skip_loudly(request, "no Chromium or chromedriver on PATH (apt-get install chromium chromium-driver)")
    fonts = (
        subprocess.run(["fc-list", ":lang=zh", "family"], capture_output=True, text=True).stdout
        if shutil.which("fc-list")
        else ""
    )
    if not fonts.strip():
        skip_loudly(request, "no font with Chinese glyphs (apt-get install fonts-wqy-zenhei)")
    return browser, driver


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _get(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=30) as response:
        return json.loads(response.read())


@pytest.fixture
def server(indexed, tmp_path):
    """`leccr serve` as its own process on a free port of 127.0.0.1; stopped by its process id."""
    cfg, _ = indexed
    port = _free_port()
    log = (tmp_path / "serve.log").open("w")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "leccr.cli",
            "serve",
            "--root",
            str(cfg.artifacts_root),
            "--port",
            str(port),
            "--device",
            "cpu",
        ],
        cwd=REPO,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                _get(url + "/api/info")
                break
            except OSError:
                if process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"leccr serve did not start: {(tmp_path / 'serve.log').read_text()}") from None
                time.sleep(0.5)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(20)
        except subprocess.TimeoutExpired:
            process.kill()
        log.close()


def test_page_in_a_headless_browser(request, indexed, server, tmp_path):
    browser, driver_path = _browser_or_skip(request)
    from selenium import webdriver
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as seen
    from selenium.webdriver.support.select import Select
    from selenium.webdriver.support.ui import WebDriverWait

    _, outcomes = indexed
    from leccr.schemas.core import read_table
    from leccr.schemas.index import INDEX_ITEMS

    item = read_table(outcomes["index"].artifact.path / "items.parquet", INDEX_ITEMS).to_pylist()[1]
    query = next(c["text"] for c in item["captions"] if c["lang"] == "de")
    expected = _get(
        f"{server}/api/search?" + urllib.parse.urlencode({"q": query, "lang": "de", "method": "leccr", "k": 12})
    )["hits"]
    assert item["item_id"] in [hit["item_id"] for hit in expected]

    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for flag in BROWSER_FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={tmp_path / 'chromium-profile'}")
    os.environ.setdefault("SE_OFFLINE", "true")  # never let Selenium Manager look for a driver online
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=driver_path))
    try:
        wait = WebDriverWait(driver, 60)
        driver.get(server + "/")
        wait.until(lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-ready") == "1")
        Select(driver.find_element(By.ID, "method")).select_by_visible_text("leccr")
        Select(driver.find_element(By.ID, "lang")).select_by_visible_text("de")
        box = driver.find_element(By.ID, "q")
        box.send_keys(query)
        driver.find_element(By.ID, "go").click()
        wait.until(seen.presence_of_all_elements_located((By.CSS_SELECTOR, "#results .card")))
        cards = driver.find_elements(By.CSS_SELECTOR, "#results .card")
        assert [card.get_attribute("data-item-id") for card in cards] == [hit["item_id"] for hit in expected]
        wait.until(
            lambda d: d.execute_script(
                "return [...document.querySelectorAll('#results .card img')]"
                ".every(i => i.complete && i.naturalWidth > 0)"
            )
        )
        assert "hits for" in driver.find_element(By.ID, "status").text
        target = next(card for card in cards if card.get_attribute("data-item-id") == item["item_id"])
        target.click()
        detail = wait.until(seen.visibility_of_element_located((By.ID, "detail")))
        assert item["item_id"] in detail.text and query in detail.find_element(By.CLASS_NAME, "captions").text
        assert "random-weight" in detail.find_element(By.CLASS_NAME, "source").text  # the demo LLaVA's noise
        screenshot = tmp_path / "search.png"
        driver.save_screenshot(str(screenshot))
        assert screenshot.stat().st_size > 10_000
        print(f"screenshot: {screenshot}")

        # A Chinese query, 3 hits (the k control): its captions in the DOM, and drawn as glyphs.
        chinese = next(c["text"] for c in item["captions"] if c["lang"] == "zh")
        expected = _get(
            f"{server}/api/search?" + urllib.parse.urlencode({"q": chinese, "lang": "zh", "method": "leccr", "k": 3})
        )["hits"]
        Select(driver.find_element(By.ID, "lang")).select_by_visible_text("zh")
        driver.find_element(By.ID, "k").clear()
        driver.find_element(By.ID, "k").send_keys("3")
        box.clear()
        box.send_keys(chinese)
        driver.find_element(By.ID, "go").click()
        wait.until(lambda d: "(zh, leccr)" in d.find_element(By.ID, "status").text)
        cards = driver.find_elements(By.CSS_SELECTOR, "#results .card")
        assert [card.get_attribute("data-item-id") for card in cards] == [hit["item_id"] for hit in expected]
        assert [card.find_element(By.CLASS_NAME, "caption").text for card in cards] == [h["caption"] for h in expected]
        assert chinese in [card.find_element(By.CLASS_NAME, "caption").text for card in cards]
        # Without a CJK font every Chinese character is the same empty box: two different characters of
        # the caption, each drawn alone in the page's font, must give two different pictures.
        characters = list(dict.fromkeys(ch for ch in chinese if "\u4e00" <= ch <= "\u9fff"))[:2]
        assert len(characters) == 2, chinese
        pictures = []
        for character in characters:
            driver.execute_script(
                "const s = document.createElement('span'); s.id = 'glyph'; s.className = 'caption';"
                "s.style.fontSize = '48px'; s.textContent = arguments[0];"
                "document.getElementById('glyph')?.remove(); document.body.appendChild(s);",
                character,
            )
            pictures.append(driver.find_element(By.ID, "glyph").screenshot_as_png)
        assert pictures[0] != pictures[1], f"{characters} are drawn alike: no CJK font in the page's font stack"
        driver.execute_script("document.getElementById('glyph').remove();")
        screenshot = tmp_path / "search-zh.png"
        driver.save_screenshot(str(screenshot))
        print(f"screenshot: {screenshot}")

        # The address holds each search: back and forward show the searches again, and an address opened
        # anew (shared, bookmarked) shows its search, form and hits.
        def address() -> dict:
            return dict(urllib.parse.parse_qsl(urllib.parse.urlsplit(driver.current_url).query))

        def shows(search: dict, hits: list[dict]) -> None:
            wait.until(
                lambda d: (
                    f"({search['lang']}, {search['method']})" in d.find_element(By.ID, "status").text
                    and [c.get_attribute("data-item-id") for c in d.find_elements(By.CSS_SELECTOR, "#results .card")]
                    == [hit["item_id"] for hit in hits]
                )
            )
            assert driver.find_element(By.ID, "q").get_attribute("value") == search["q"]
            assert Select(driver.find_element(By.ID, "lang")).first_selected_option.text == search["lang"]
            assert Select(driver.find_element(By.ID, "method")).first_selected_option.text == search["method"]
            assert driver.find_element(By.ID, "k").get_attribute("value") == search["k"]

        from leccr.search.request import DEFAULT_K

        german = {"q": query, "lang": "de", "method": "leccr", "k": str(DEFAULT_K)}  # the page's k, untouched
        zh = {"q": chinese, "lang": "zh", "method": "leccr", "k": "3"}
        german_hits = _get(f"{server}/api/search?" + urllib.parse.urlencode(german))["hits"]
        assert address() == zh
        driver.back()
        assert address() == german
        shows(german, german_hits)
        driver.forward()
        assert address() == zh
        shows(zh, expected)
        driver.back()
        driver.back()  # the page as first opened: no search
        assert address() == {}
        wait.until(lambda d: not d.find_elements(By.CSS_SELECTOR, "#results .card"))
        assert driver.find_element(By.ID, "q").get_attribute("value") == ""

        shared = {"q": chinese, "lang": "zh", "method": "baseline", "k": "5"}
        driver.get(server + "/?" + urllib.parse.urlencode(shared))
        shows(shared, _get(f"{server}/api/search?" + urllib.parse.urlencode(shared))["hits"])
        assert len(driver.find_elements(By.CSS_SELECTOR, "#results .card")) == 5 and chinese in driver.title
        driver.get(server + "/?" + urllib.parse.urlencode({**shared, "lang": "xx"}))  # a language not trained
        wait.until(lambda d: d.find_element(By.ID, "status").text.startswith("error: "))
        assert "xx" in driver.find_element(By.ID, "status").text
    finally:
        driver.quit()
