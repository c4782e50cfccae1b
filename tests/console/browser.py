"""A real headless Chromium for the console tests (Debian's ``chromium`` and ``chromium-driver``).

``Browser`` wraps one Selenium session: it opens console pages, collects the page's console
errors (failing the test on any), checks that every link of a page answers 200, and saves
screenshots under one temporary directory, printed so a person (and CI's artifacts) can look.
"""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urljoin, urlsplit

import httpx
import pytest

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
T = TypeVar("T")


def available() -> bool:
    return os.access(CHROMIUM, os.X_OK) and os.access(CHROMEDRIVER, os.X_OK)


class Browser:
    def __init__(self, shots: Path) -> None:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service

        options = webdriver.ChromeOptions()
        options.binary_location = CHROMIUM
        for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,1000",
                     "--no-first-run", "--disable-background-networking", "--disable-component-update",
                     "--disable-sync", "--disable-default-apps", "--disable-extensions"):
            options.add_argument(flag)
        options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
        self.driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
        self.shots = shots
        self.count = 0
        self.errors: list[dict[str, Any]] = []
        self.late_expected: int | None = None

    def close(self) -> None:
        self.driver.quit()

    def open(self, url: str) -> None:
        self.driver.get(url)
        self.check_console()

    def check_console(self, expected_status: int | None = None) -> None:
        """Fail on any error the page logged (script errors, CSP violations, failed loads), but the
        page's own ``expected_status`` (a refused sign-in is a 401 page, logged as a failed load)."""
        entries = self.driver.get_log("browser")
        # The failed-load entry of an expected status may reach the log only after this read (a
        # click returns before the page settles): it stays allowed for the next read too.
        allowed = {f"status of {s} " for s in (expected_status, self.late_expected) if s}
        self.late_expected = expected_status
        severe = [e for e in entries if e.get("level") == "SEVERE" and not any(a in e["message"] for a in allowed)]
        self.errors.extend(severe)
        assert not severe, f"console errors on {self.driver.current_url}: {severe}"

    def shot(self, name: str) -> Path:
        self.count += 1
        path = self.shots / f"{self.count:02d}-{name}.png"
        self.driver.save_screenshot(str(path))
        return path

    def css(self, selector: str) -> Any:
        from selenium.webdriver.common.by import By

        return self.driver.find_element(By.CSS_SELECTOR, selector)

    def all(self, selector: str) -> list[Any]:
        from selenium.webdriver.common.by import By

        return list(self.driver.find_elements(By.CSS_SELECTOR, selector))

    def text(self, selector: str) -> str:
        found = self.all(selector)
        return str(found[0].text) if found else ""

    def fill(self, selector: str, value: str) -> None:
        field = self.css(selector)
        field.clear()
        field.send_keys(value)

    def click(self, selector: str, expected_status: int | None = None) -> None:
        """Submit a form by its button and wait for the answer to replace the page.

        Selenium's click can return before the new document arrived: reading the URL or the page
        right after it read the old one (a redirect not yet followed, the sign-in form still there).
        The live refresh swaps only ``[data-live]`` parts, so the old ``<html>`` going stale means the
        browser loaded the answer."""
        page = self.css("html")
        self.css(selector).click()
        self.wait(lambda: self.replaced(page), 60, f"the page to answer the click on {selector}")
        self.check_console(expected_status)

    @staticmethod
    def replaced(element: Any) -> bool:
        from selenium.common.exceptions import StaleElementReferenceException

        try:
            _ = element.tag_name  # any read of a replaced element raises
        except StaleElementReferenceException:
            return True
        return False

    def wait(self, predicate: Callable[[], T], timeout_s: float = 60, message: str = "") -> T:
        """Poll ``predicate`` (without reloading: the page refreshes itself) until truthy."""
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                value = predicate()
            except Exception:  # an element replaced by the live refresh between find and read
                value = None  # type: ignore[assignment]
            if value:
                return value
            if time.monotonic() > deadline:
                self.shot("timeout")
                raise AssertionError(f"not within {timeout_s:g}s: {message or predicate}")
            time.sleep(0.25)

    def session(self) -> httpx.Client:
        """An HTTP client carrying this browser's cookies (downloads, link checks)."""
        cookies = {c["name"]: c["value"] for c in self.driver.get_cookies()}
        return httpx.Client(cookies=cookies, timeout=30, follow_redirects=False)

    def check_links(self) -> int:
        """Every link of the current page on this origin answers 200; returns how many were checked."""
        here = self.driver.current_url
        origin = urlsplit(here)[:2]
        hrefs = {urljoin(here, a.get_attribute("href")) for a in self.all("a[href]")}
        hrefs |= {urljoin(here, e.get_attribute("src")) for e in self.all("script[src]")}
        hrefs |= {urljoin(here, e.get_attribute("href")) for e in self.all("link[rel=stylesheet]")}
        with self.session() as client:
            for href in sorted(hrefs):
                assert urlsplit(href)[:2] == origin, f"{here} links off-site: {href}"
                response = client.get(href)
                assert response.status_code == 200, f"{here}: link {href} answers {response.status_code}"
        return len(hrefs)


@pytest.fixture(scope="session")
def browser() -> Any:
    if not available():
        pytest.fail(f"the console tests need {CHROMIUM} and {CHROMEDRIVER} (apt-get install chromium chromium-driver)")
    shots = Path(tempfile.mkdtemp(prefix="promptfleet-console-shots-"))
    print(f"\nconsole screenshots: {shots}")
    browser = Browser(shots)
    try:
        yield browser
    finally:
        browser.close()  # the screenshots stay: they are the run's artifacts
