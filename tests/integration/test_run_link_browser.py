"""A run link in a real browser (issue 11 item 10): a lab member follows
``/omeflow/run/celldetector_preprocess?image=<id>`` from OMERO.web or an e-mail, logs in if
needed, sees the image the run will take, clicks "Start run", and the run succeeds on exactly
that image. A bad link shows what to fix and starts nothing. Runs against ``live_stack``
(api-server, scheduler, dag-processor, triggerer on 127.0.0.1) with Debian's chromium."""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import quote

import pytest

from tests.browser import Screenshots, chromium
from tests.stack_fixture import Stack

pytestmark = pytest.mark.slow

DAG_ID = "celldetector_preprocess"
RUN_TIMEOUT_S = 300
WAIT_S = 60


@pytest.fixture(scope="module")
def slide(live_stack: Stack) -> int:
    """A small slide in the stack's embedded local store, in a dataset of its own."""
    import numpy as np

    from hpc_jobs.config import SiteConfig
    from hpc_jobs.embedded import embedded_site_file
    from hpc_jobs.stores.local import LocalStore

    site = SiteConfig.load(embedded_site_file(live_stack.home / "var"))
    store = LocalStore(site.store.path)
    pixels = np.full((2, 160, 200), 100, dtype=np.uint16)
    return store.add_image("run-link slide", pixels, ["DAPI", "CD8"])


def _runs(stack: Stack) -> dict[str, dict[str, Any]]:
    reply = stack.api("GET", f"/api/v2/dags/{DAG_ID}/dagRuns", params={"limit": 100})
    assert reply.status_code == 200, reply.text
    return {r["dag_run_id"]: r for r in reply.json()["dag_runs"]}


def test_a_run_link_starts_the_run_in_two_clicks(live_stack: Stack, slide: int) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    shots = Screenshots("run_link")
    live_stack.wait_for(f"{DAG_ID} to be parsed",
                        lambda: live_stack.api("GET", f"/api/v2/dags/{DAG_ID}").status_code == 200,
                        300)
    before = set(_runs(live_stack))
    link = (f"{live_stack.base_url}/omeflow/run/{DAG_ID}?image={slide}"
            f"&steps={quote(json.dumps(['export_zarr']))}")
    with chromium() as driver:
        wait = WebDriverWait(driver, WAIT_S)
        driver.get(link)  # not logged in: Airflow's login page, then back to the link
        wait.until(ec.presence_of_element_located((By.CSS_SELECTOR, "input[name=username]")))
        shots.save(driver, "1-login.png")
        login_then_back(driver, live_stack, wait)
        start = wait.until(ec.element_to_be_clickable((By.ID, "start")))
        page = driver.find_element(By.TAG_NAME, "body").text
        assert f"Start a run of {DAG_ID}" in page
        assert f"image_ids [{slide}]" in page and 'steps ["export_zarr"]' in page, page
        shots.save(driver, "2-run-link.png")
        start.click()  # the second click: the run starts and its page opens
        wait.until(lambda d: f"/dags/{DAG_ID}/runs/" in d.current_url)
        shots.save(driver, "3-run-page.png")
        run_id = driver.current_url.split("/runs/", 1)[1].split("?")[0]

        bad = f"{live_stack.base_url}/omeflow/run/{DAG_ID}?image=12x"
        driver.get(bad)
        alert = wait.until(ec.presence_of_element_located((By.CSS_SELECTOR, "[role=alert]")))
        assert "image='12x' is not an id: give positive integers" in alert.text
        assert not driver.find_element(By.ID, "start").is_enabled()
        shots.save(driver, "4-bad-link.png")

    from urllib.parse import unquote

    run_id = unquote(run_id)
    assert set(_runs(live_stack)) - before == {run_id}  # one run, from the one click
    path = f"/api/v2/dags/{DAG_ID}/dagRuns/{quote(run_id, safe='')}"
    final = live_stack.wait_for(
        f"run {run_id} to end",
        lambda: (r := live_stack.api("GET", path).json())["state"] in ("success", "failed") and r,
        RUN_TIMEOUT_S)
    assert final["state"] == "success", live_stack.diagnostics()
    assert final["conf"] == {"image_ids": [slide], "steps": ["export_zarr"]}
    check = live_stack.api("GET", f"{path}/taskInstances/check_images/xcomEntries/return_value",
                           params={"deserialize": True}).json()["value"]
    check = json.loads(check) if isinstance(check, str) else check
    assert check["image_ids"] == [slide]


def login_then_back(driver: Any, stack: Stack, wait: Any) -> None:
    """Fill Airflow's login form on the page the link redirected to; Airflow sends the
    browser back to the link (``next``)."""
    from selenium.webdriver.common.by import By

    driver.find_element(By.CSS_SELECTOR, "input[name=username]").send_keys("admin")
    driver.find_element(By.CSS_SELECTOR, "input[type=password]").send_keys(stack.password)
    driver.find_element(By.CSS_SELECTOR, "button[type=submit]").click()
    wait.until(lambda d: "/omeflow/run/" in d.current_url)


def test_a_run_link_needs_a_login_and_a_known_dag(live_stack: Stack) -> None:
    anonymous = live_stack.api("GET", f"/omeflow/run/{DAG_ID}?image=1", auth=False)
    assert anonymous.status_code == 303 and "login" in anonymous.headers["location"]
    assert "next=" in anonymous.headers["location"]
    missing = live_stack.api("GET", "/omeflow/run/no_such_dag?image=1")
    assert missing.status_code == 404 and "no Dag 'no_such_dag'" in missing.text
