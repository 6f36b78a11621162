"""The playground page (/playground) in a real headless browser: Debian's chromium, driven through selenium. The
page is reachable without the API key; it asks for the key, lists the models, and streams an answer, which is the
one the API gives, with its TTFT and tokens/s. (docs/images/playground.png was taken the same way, from
`strata serve smollm2-135m-instruct`: the demo model writes noise.)"""
from __future__ import annotations

import os
import re
import shutil
import subprocess

import httpx
import openai
import pytest

from cluster.config import ClusterConfig, ModelConfig
from tests.support.polling import wait_for
from tests.support.serve_app import deploy

pytestmark = pytest.mark.slow

API_KEY = "playground-key"
CONFIG = ClusterConfig(models=[ModelConfig(model="demo", num_kv_blocks=128, max_num_seqs=4)], api_keys=[API_KEY],
                       app_name="strata-playground")
QUESTION = "What is the capital of France?"


def chromium_and_driver() -> tuple[str, str]:
    """Debian's chromium and chromedriver, installed with apt-get when missing (the tests run as root)."""
    def found() -> tuple[str | None, str | None]:
        return shutil.which("chromium"), shutil.which("chromedriver")

    if None in found() and shutil.which("apt-get") and os.geteuid() == 0:
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        install = ["apt-get", "install", "-y", "-q", "--no-install-recommends", "chromium", "chromium-driver"]
        if subprocess.run(install, env=env, capture_output=True, timeout=900).returncode != 0:
            subprocess.run(["apt-get", "update", "-q"], env=env, capture_output=True, timeout=300)
            subprocess.run(install, env=env, capture_output=True, timeout=900)
    browser, driver = found()
    if browser is None or driver is None:
        pytest.skip("needs Debian's chromium and chromium-driver, which apt-get could not install here")
    return browser, driver


@pytest.fixture(scope="module")
def base_url(serve_url):
    yield from deploy(serve_url, CONFIG)


@pytest.fixture(scope="module")
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    binary, driver_path = chromium_and_driver()
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,720"):
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=Service(executable_path=driver_path))
    yield driver
    driver.quit()


def test_the_page_and_the_redirect_need_no_key(base_url):
    page = httpx.get(f"{base_url}/playground", timeout=30)
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "<title>Strata playground</title>" in page.text
    assert "http://" not in page.text and "https://" not in page.text  # nothing from elsewhere
    root = httpx.get(f"{base_url}/", timeout=30, follow_redirects=True)
    assert str(root.url) == f"{base_url}/playground" and root.text == page.text
    assert httpx.get(f"{base_url}/v1/models", timeout=30).status_code == 401


def test_asks_for_the_key_then_streams_an_answer_with_its_speed(base_url, browser, tmp_path):
    from selenium.webdriver.common.by import By

    def text(css: str) -> str:
        return browser.execute_script("const e = document.querySelector(arguments[0]); return e && e.textContent;",
                                      css) or ""

    def field(element_id: str, value: str) -> None:
        element = browser.find_element(By.ID, element_id)
        element.clear()
        element.send_keys(value)

    browser.get(f"{base_url}/")
    wait_for(lambda: "needs an API key" in text("#status"), timeout=30, what="the page to ask for the API key")
    field("api-key", API_KEY)
    browser.find_element(By.ID, "connect").click()
    wait_for(lambda: text("#model option") == "demo", timeout=30, what="the model list")
    field("temperature", "0")
    field("max-tokens", "24")
    # Every state the answer's text goes through, as the browser shows it.
    browser.execute_script("""
        window.shown = [];
        new MutationObserver(() => {
            const answer = document.querySelector('.assistant .text');
            if (answer && answer.textContent) window.shown.push(answer.textContent);
        }).observe(document.getElementById('messages'), {subtree: true, childList: true, characterData: true});""")
    field("prompt", QUESTION)
    browser.find_element(By.ID, "send").click()
    stats = wait_for(lambda: text(".assistant .stats"), timeout=60, what="the answer's stats")
    assert re.fullmatch(r"TTFT \d+ ms · [\d.]+ tokens/s · \d+ tokens", stats), stats

    api = openai.OpenAI(base_url=f"{base_url}/v1", api_key=API_KEY, max_retries=0)
    expected = api.chat.completions.create(model="demo", messages=[{"role": "user", "content": QUESTION}],
                                           temperature=0, max_tokens=24)
    answer, shown = text(".assistant .text"), browser.execute_script("return window.shown;")
    assert answer == expected.choices[0].message.content
    assert stats.endswith(f" {expected.usage.completion_tokens} tokens")
    assert len(set(shown)) > 1 and all(answer.startswith(s) for s in shown), shown  # it grew as tokens came
    assert text(".user") == QUESTION

    screenshot = tmp_path / "playground.png"  # the page as a person sees it
    assert browser.save_screenshot(str(screenshot)) and screenshot.read_bytes().startswith(b"\x89PNG")
