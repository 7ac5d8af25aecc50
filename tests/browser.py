"""A real browser for UI tests: Debian's ``chromium`` + ``chromium-driver`` driven by Selenium
(headless; no browser download is possible here, setup.sh installs both packages).

- :func:`chromium`: a driver for one test module (context manager; quits the browser after).
- :func:`login`: log in through Airflow's login page (the simple auth manager's form), as a
  person would, and wait for the UI's token cookie.
- :class:`Screenshots`: numbered PNGs under ``$OMEFLOW_ARTIFACTS/<name>/`` (default
  ``var/artifacts/``, git-ignored); each path is printed so CI logs say where they are.
- :func:`fits`: whether the page needs no scrolling in the window.

Wait on conditions (``WebDriverWait``), never on fixed sleeps.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parent.parent
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
#: Environment variable naming the folder test artifacts (screenshots) are written under.
ARTIFACTS_ENV = "OMEFLOW_ARTIFACTS"
#: The window every browser test sees (a lab laptop's screen).
WINDOW = (1400, 900)
#: How long the login page may take to appear (the React UI's first load on a busy CI box).
LOGIN_TIMEOUT_S = 60


def artifacts_root() -> Path:
    """``$OMEFLOW_ARTIFACTS``, else ``var/artifacts`` in the repository."""
    env = os.environ.get(ARTIFACTS_ENV)
    return Path(env).absolute() if env else REPO / "var" / "artifacts"


@contextmanager
def chromium(window: tuple[int, int] = WINDOW) -> Iterator[Any]:
    """A headless Chromium driven by Selenium, ``window`` pixels wide and high; quit on exit.

    Fails (not skips) with the fix when Selenium, ``chromium`` or ``chromium-driver`` is
    missing: CI must run the browser tests, not pass without them.
    """
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        pytest.fail("selenium is missing: it is in omeflow's dev extra (make setup)")
    if not (Path(CHROMIUM).exists() and Path(CHROMEDRIVER).exists()):
        pytest.fail("chromium and chromium-driver (Debian packages) are needed: run "
                    "scripts/setup.sh as root (make setup)")
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                f"--window-size={window[0]},{window[1]}", "--disable-extensions",
                "--no-first-run", "--lang=en-US"):
        opts.add_argument(arg)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
    driver.set_window_size(*window)
    try:
        yield driver
    finally:
        driver.quit()


def login(driver: Any, base_url: str, password: str, user: str = "admin",
          timeout: float = LOGIN_TIMEOUT_S) -> None:
    """Open ``base_url``, fill Airflow's login form (user name, password, submit) and wait
    until the UI holds its token cookie (``_token``)."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    driver.get(base_url.rstrip("/") + "/")
    wait = WebDriverWait(driver, timeout)
    name = wait.until(ec.presence_of_element_located((By.CSS_SELECTOR, "input[name=username]")))
    name.send_keys(user)
    driver.find_element(By.CSS_SELECTOR, "input[type=password]").send_keys(password)
    driver.find_element(By.CSS_SELECTOR, "button[type=submit]").click()
    wait.until(lambda d: d.get_cookie("_token") is not None)


class Screenshots:
    """Screenshots of one test (or module) in ``artifacts_root() / name``."""

    def __init__(self, name: str) -> None:
        self.folder = artifacts_root() / name

    def save(self, driver: Any, name: str) -> Path:
        """``driver``'s window as ``<folder>/<name>`` (a ``.png`` name); the path, printed."""
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.folder / name
        driver.save_screenshot(str(path))
        print(f"screenshot: {path}")
        return path


def fits(driver: Any) -> bool:
    """Whether the page needs no scrolling in the browser window."""
    return bool(driver.execute_script(
        "const e = document.documentElement; "
        "return e.scrollWidth <= window.innerWidth && e.scrollHeight <= window.innerHeight"))
