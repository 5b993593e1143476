"""The playground in a real browser: headless Chromium (Debian's `chromium` and `chromium-driver`)
drives the page end to end with a tiny pair. Each test saves a screenshot under
build/test-artifacts/ (never committed)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tandem.sdk import Client
from tandem.sdk.bench.launch import serving
from tandem.sdk.bench.linksim import LinkProxy
from tandem.sdk.playground import Playground, create_app

ROOT = Path(__file__).resolve().parents[1]
ARTIFACTS = ROOT / "build" / "test-artifacts"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")

pytestmark = pytest.mark.skipif(
    not (CHROMIUM and CHROMEDRIVER),
    reason="needs Debian's chromium and chromium-driver (apt-get install chromium chromium-driver; .ci/run installs them)",
)


@pytest.fixture(scope="module")
def page(words_pair, words_server, tmp_path_factory):
    """(driver, link): headless Chromium on a playground whose client reaches the readable-text
    gateway through a link proxy of its own."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    target, drafter = words_pair
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    # the machine may have no network: without these Chromium waits on lookups it cannot make
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", "--window-size=1440,1100",
                 f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}"):
        options.add_argument(flag)
    with LinkProxy.in_front_of(words_server) as link:
        client = Client(drafter=drafter, gateway=link.url, timeout_s=10, retries=1, probe_timeout_s=0.5,
                        rejoin_every=8, progress=False)
        playground = Playground(client, link, gateway=words_server, target=target.name)
        with serving(create_app(playground), lifespan="on") as url:
            driver = webdriver.Chrome(options=options, service=Service(CHROMEDRIVER))
            driver.set_page_load_timeout(30)
            try:
                driver.get(url)
                yield driver, link
            finally:
                driver.quit()


def wait_for(driver, condition, timeout: float = 30, message: str = ""):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout, poll_frequency=0.05).until(lambda d: condition(d), message)


def state(driver) -> str:
    return driver.find_element("css selector", "body").get_attribute("data-state")


def screenshot(driver, name: str) -> None:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    driver.save_screenshot(str(ARTIFACTS / name))


def start(driver, prompt: str, mode: str = "speculative", max_tokens: int = 120) -> int:
    """Fill the form and click Generate; returns the number of this generation on the page."""
    from selenium.webdriver.support.ui import Select

    wait_for(driver, lambda d: state(d) not in ("loading", "running"), message="the page never became ready")
    box = driver.find_element("id", "prompt")
    box.clear()
    box.send_keys(prompt)
    Select(driver.find_element("id", "mode")).select_by_value(mode)
    tokens = driver.find_element("id", "max-tokens")
    tokens.clear()
    tokens.send_keys(str(max_tokens))
    runs = driver.execute_script("return window.playground.runs")
    driver.find_element("id", "generate").click()
    return runs + 1


def finished(driver, run: int, timeout: float = 60) -> None:
    wait_for(driver, lambda d: d.execute_script("return window.playground.runs") == run and state(d) == "done",
             timeout, message=f"generation {run} did not finish")


def spans(driver, origin: str) -> list:
    return driver.find_elements("css selector", f"#output .tok-{origin}")


def usage(driver, key: str) -> str:
    return driver.find_element("id", f"usage-{key}").text


def set_slider(driver, element_id: str, value: int) -> None:
    driver.execute_script(
        "const e = document.getElementById(arguments[0]); e.value = arguments[1];"
        "e.dispatchEvent(new Event('input')); e.dispatchEvent(new Event('change'));", element_id, value)


def test_a_speculative_answer_is_coloured_by_origin(page):
    driver, _ = page
    assert "tiny-words-drafter" in driver.find_element("id", "drafter").text
    finished(driver, start(driver, "tell me about the sea", max_tokens=60))
    assert spans(driver, "accepted") and spans(driver, "cloud") and not spans(driver, "local")
    assert spans(driver, "accepted")[0].get_attribute("title") == "drafted on the device, accepted by the cloud"
    assert usage(driver, "tokens") == "60" and usage(driver, "fallbacks") == "0"
    assert int(usage(driver, "rounds")) >= 1 and usage(driver, "acceptance").endswith("%")
    # the text on the page is the text generated, every piece in order
    text = "".join(s.get_attribute("textContent") for s in driver.find_elements("css selector", "#output .tok"))
    assert text == driver.execute_script("return window.playground.last.text")
    # the charts and the timeline are filled in
    assert driver.find_elements("css selector", "#chart-acceptance rect.bar-accept")
    assert driver.find_elements("css selector", "#chart-draft rect.bar-k")
    assert driver.find_elements("css selector", "#chart-acceptance polyline.line-rate")
    rows = driver.find_elements("css selector", "#timeline tbody tr")
    assert len(rows) == int(usage(driver, "rounds"))
    screenshot(driver, "playground-speculative.png")


def test_cutting_the_link_mid_generation_finishes_locally(page):
    driver, link = page
    set_slider(driver, "rtt", 60)  # slower rounds, so the cut lands mid-generation
    wait_for(driver, lambda d: link.config.delay_ms == 30, message="the RTT slider did not reach the link")
    assert "+60 ms" in driver.find_element("id", "link-status").text
    run = start(driver, "tell me about the hills", max_tokens=160)
    wait_for(driver, lambda d: len(d.find_elements("css selector", "#timeline tbody tr")) >= 3,
             message="no verify rounds arrived")
    driver.find_element("id", "cut-link").click()
    wait_for(driver, lambda d: link.down, message="cutting did not reach the link")
    finished(driver, run)
    assert spans(driver, "local"), "no token produced by the device alone after the cut"
    assert spans(driver, "accepted")  # from before the cut
    assert int(usage(driver, "fallbacks")) >= 1 and usage(driver, "tokens") == "160"
    assert driver.find_elements("css selector", "#timeline tr.mark.offline")
    assert driver.find_elements("css selector", "#chart-acceptance line.mark-offline")
    text = "".join(s.get_attribute("textContent") for s in driver.find_elements("css selector", "#output .tok"))
    assert text == driver.execute_script("return window.playground.last.text")  # no token lost
    assert "cut" in driver.find_element("id", "link-status").text
    screenshot(driver, "playground-cut-link.png")

    # restore: the next answer is speculative again
    driver.find_element("id", "restore-link").click()
    wait_for(driver, lambda d: not link.down, message="restoring did not reach the link")
    set_slider(driver, "rtt", 0)
    finished(driver, start(driver, "and the sea", max_tokens=40))
    assert spans(driver, "accepted") and not spans(driver, "local") and usage(driver, "fallbacks") == "0"


def test_auto_shows_its_decision_and_bad_input_shows_an_error(page):
    driver, _ = page
    policy = driver.find_element("id", "policy")
    policy.clear()
    finished(driver, start(driver, "which mode?", mode="auto", max_tokens=16))
    chosen = driver.execute_script("return window.playground.last.decision.mode")
    row = driver.find_element("css selector", "#decision tr.chosen")
    assert row.find_elements("css selector", "td")[0].text == chosen
    assert "lowest predicted seconds per token" in driver.find_element("id", "decision").text

    policy.send_keys(str(ROOT / "samples" / "policies" / "offline-first.yaml"))
    driver.find_element("id", "tags").send_keys("cloud-ok")
    finished(driver, start(driver, "which mode now?", mode="auto", max_tokens=16))
    assert 'assist: rule "allowed-to-ask"' in driver.find_element("id", "decision").text

    policy.clear()
    policy.send_keys("no/such/policy.yaml")
    run = start(driver, "and now?", mode="auto", max_tokens=16)
    wait_for(driver, lambda d: d.execute_script("return window.playground.runs") == run and state(d) == "error",
             message="a bad policy file did not end in an error")
    error = driver.find_element("id", "error")
    assert error.is_displayed() and "policy file not found: no/such/policy.yaml" in error.text
    policy.clear()
    driver.find_element("id", "tags").clear()


def test_stop_ends_the_generation_and_the_next_one_runs(page):
    driver, _ = page
    run = start(driver, "a long one", max_tokens=1000)
    wait_for(driver, lambda d: spans(d, "accepted"), message="no text arrived")
    driver.find_element("id", "stop").click()
    wait_for(driver, lambda d: state(d) == "stopped", message="Stop did not end the generation")
    assert "stopped after" in driver.find_element("id", "run-status").text
    assert driver.execute_script("return window.playground.runs") == run
    finished(driver, start(driver, "a short one", max_tokens=10))  # the playground is free again
    assert usage(driver, "tokens") == "10"


def test_the_usage_panel_shows_the_cloud_alone_rate_beside_a_hybrid_run(page):
    driver, _ = page
    finished(driver, start(driver, "tell me about the sea", mode="cloud", max_tokens=20))
    cloud = usage(driver, "cloud-alone")
    assert cloud.endswith("tok/s") and float(cloud.split()[0]) > 0
    finished(driver, start(driver, "tell me about the sea", max_tokens=20))
    spec = usage(driver, "cloud-alone")
    assert spec.startswith(cloud) and "this run" in spec and spec.endswith("x)")
