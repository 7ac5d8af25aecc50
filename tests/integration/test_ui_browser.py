"""``celldetector_preprocess`` through Airflow's React UI in a real browser, as a lab member uses
it (issue 11 item 6): Debian's ``chromium`` driven by Selenium (``tests/browser.py``) against
``live_stack`` (api-server, scheduler, dag-processor, triggerer on 127.0.0.1; embedded local
store and scheduler).

1. Log in through Airflow's login page.
2. Open the Dag's trigger form, fill ``image_ids`` with a small synthetic image and
   ``marker_channel=5`` (the image has 2 channels), submit: the run's first task
   (``check_images``) fails, and its log in the UI says which channels exist and which to use.
   The form itself accepts 5: the Param schema allows 0..255 (how many channels an image has
   only the store knows), and the form's number field clamps a value beyond the schema (300)
   to 255 on leaving the field, so that run fails in check_images the same way.
3. The same form with valid channels: the run succeeds (export → Cellpose → eCDF).
4. Browse → "HPC jobs": the run's three cluster jobs are listed (rows ``data-job-id`` = the job
   key); one row's log link opens the job's log view with the step's own output.

Selectors: ``data-testid``s of Airflow 3.3's UI (``trigger-dag-button``, ``trigger-dag-submit``,
``state-badge``, ``table-cell-state``, ``virtualized-list``), form fields by their param name
(``name=element_<param>``, ``id=element_<param>`` for the JSON editor), links and headings by
their visible text. Screenshots of every step go to ``$OMEFLOW_ARTIFACTS/ui/`` (default
``var/artifacts/ui/``; paths printed).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote

import pytest

from tests.browser import Screenshots, chromium, login
from tests.stack_fixture import Stack

pytestmark = pytest.mark.slow

DAG_ID = "celldetector_preprocess"
SHOTS = Screenshots("ui")
#: A page or element of the UI to appear.
WAIT_S = 60
#: A run to end: check_images alone, or export + Cellpose + eCDF of a 320 x 320 px image (about
#: 1 min alone on 2 cores; 4.5 min with eight people's tests on the same 2 cores: a bound only).
RUN_TIMEOUT_S = 480
#: The per-image cluster steps of the Dag, in order (task ids under the ``image`` group).
STEPS = ("export_zarr", "segment_nuclei", "ecdf")


@dataclass(frozen=True)
class Lab:
    """The running stack and the synthetic image a lab member processes in it."""

    stack: Stack
    image_id: int
    channels: tuple[str, ...]
    nuclei: int


@pytest.fixture(scope="module")
def lab(live_stack: Stack) -> Lab:
    """A 320 x 320 px, 2-channel synthetic slide (tissue ROIs included) in the stack's embedded
    local store; the Dag unpaused."""
    from hpc_jobs.config import SiteConfig
    from hpc_jobs.embedded import embedded_site_file
    from hpc_jobs.stores.local import LocalStore
    from hpc_jobs.synth import SynthSpec, generate

    site = SiteConfig.load(embedded_site_file(live_stack.home / "var"))
    assert site.store.path is not None, "the embedded site has a local store"
    store = LocalStore(site.store.path)
    synth = generate(SynthSpec(width=320, height=320, seed=3), store,
                     out_truth=site.data_root / "truth" / "ui-browser")
    live_stack.unpause(DAG_ID)
    info = store.get_image(synth["image_id"])
    return Lab(live_stack, int(synth["image_id"]), tuple(info.channel_names),
               int(synth["nuclei"]))


@pytest.fixture(scope="module")
def browser(lab: Lab) -> Iterator[Any]:
    """Chromium, logged in as admin through Airflow's login page."""
    with chromium() as driver:
        login(driver, lab.stack.base_url, lab.stack.password)
        yield driver


# -------------------------------------------------------------------------------------------
# What a lab member does, one helper per gesture
# -------------------------------------------------------------------------------------------
def _until(driver: Any, stack: Stack, what: str, condition: Callable[[Any], Any],
           timeout: float = WAIT_S) -> Any:
    """Wait until ``condition(driver)`` is truthy; on time-out a screenshot and the stack's
    logs. Fails at once if a component died."""
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.support.ui import WebDriverWait

    def probe(d: Any) -> Any:
        stack.check_alive()
        return condition(d)

    try:
        return WebDriverWait(driver, timeout).until(probe)
    except TimeoutException:
        shot = SHOTS.save(driver, f"timeout_{what.replace(' ', '_')[:60]}.png")
        raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what} (screenshot "
                             f"{shot})\n{stack.diagnostics()}") from None


def _open_trigger_form(driver: Any, stack: Stack) -> None:
    """The Dag's page → its Trigger button → the trigger form with the run parameters."""
    from selenium.webdriver.common.by import By

    driver.get(f"{stack.base_url}/dags/{DAG_ID}")
    _until(driver, stack, "the Trigger button", lambda d: d.find_element(
        By.CSS_SELECTOR, "[data-testid=trigger-dag-button]")).click()
    _until(driver, stack, "the form's image_ids editor", lambda d: d.find_element(
        By.CSS_SELECTOR, "#element_image_ids .view-lines"))


def _type_id_list(driver: Any, stack: Stack, name: str, ids: list[int]) -> None:
    """Fill the JSON editor of the array param ``name`` with ``ids``.

    The editor (Monaco) closes brackets as they are typed and the form re-formats every valid
    JSON value, so typing ``[7]`` key by key does not give ``[7]``. What works like a person
    who knows the editor: select all, type the ids, select all, type ``[`` (the editor wraps
    the selection in brackets)."""
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    lines = f"#element_{name} .view-lines"
    driver.find_element(By.CSS_SELECTOR, lines).click()

    def select_all_and_type(text: str) -> None:
        (ActionChains(driver).key_down(Keys.CONTROL).send_keys("a").key_up(Keys.CONTROL)
         .send_keys(text).perform())

    select_all_and_type(", ".join(str(i) for i in ids))
    select_all_and_type("[")

    def shown(d: Any) -> Any:
        text = d.find_element(By.CSS_SELECTOR, lines).text.replace("\xa0", " ")
        try:
            return json.loads(text)
        except ValueError:
            return None

    _until(driver, stack, f"{name} to show {ids}", lambda d: shown(d) == ids)


def _set_number(driver: Any, stack: Stack, name: str, value: int) -> None:
    """Replace the number in the form field of param ``name``."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    field = driver.find_element(By.NAME, f"element_{name}")
    driver.execute_script("arguments[0].scrollIntoView({block: 'center'})", field)
    field.send_keys(Keys.CONTROL, "a")
    field.send_keys(str(value))
    _until(driver, stack, f"{name} = {value}",
           lambda d: field.get_attribute("value") == str(value))


def _fill_form(driver: Any, lab: Lab, marker_channel: int, shot: str) -> None:
    _open_trigger_form(driver, lab.stack)
    _type_id_list(driver, lab.stack, "image_ids", [lab.image_id])
    _set_number(driver, lab.stack, "dapi_channel", 0)
    _set_number(driver, lab.stack, "marker_channel", marker_channel)
    SHOTS.save(driver, shot)


def _submit(driver: Any, stack: Stack) -> str:
    """Press the form's Trigger button; the UI opens the new run: its run id."""
    from selenium.webdriver.common.by import By

    driver.find_element(By.CSS_SELECTOR, "[data-testid=trigger-dag-submit]").click()
    url = _until(driver, stack, "the new run's page",
                 lambda d: d.current_url if f"/dags/{DAG_ID}/runs/" in d.current_url else None)
    return unquote(url.split("/runs/", 1)[1].split("/")[0])


def _final_run_state(driver: Any, stack: Stack, run_id: str) -> str:
    """The state badge beside the run's heading once the run ended (the page refreshes
    itself while the run is going)."""
    from selenium.webdriver.common.by import By

    badge = (By.XPATH, f"//h2[normalize-space()='{run_id}']"
                       "/following-sibling::*[@data-testid='state-badge']")

    def ended(d: Any) -> str | None:
        found = d.find_elements(*badge)
        text = found[0].text.strip() if found else ""
        return text if text in ("Success", "Failed") else None

    return str(_until(driver, stack, f"run {run_id} to end", ended, RUN_TIMEOUT_S))


def _task_states(driver: Any) -> dict[str, str]:
    """Task id (with map index) → state, from the run page's task instance table."""
    from selenium.webdriver.common.by import By

    out = {}
    for row in driver.find_elements(By.CSS_SELECTOR, "tbody tr"):
        cells = {c.get_attribute("data-testid"): c.text.strip()
                 for c in row.find_elements(By.CSS_SELECTOR, "td[data-testid]")}
        if "table-cell-state" in cells and "table-cell-task_display_name" in cells:
            index = cells.get("table-cell-rendered_map_index", "")
            out[cells["table-cell-task_display_name"] + (f"[{index}]" if index else "")] = (
                cells["table-cell-state"])
    return out


def _api_run(stack: Stack, run_id: str) -> dict[str, Any]:
    reply = stack.api("GET", f"/api/v2/dags/{DAG_ID}/dagRuns/{run_id}")
    assert reply.status_code == 200, reply.text
    return dict(reply.json())


def _api_failure(stack: Stack, run_id: str) -> str:
    """The run's conf, its task states, the log of each failed task and the components' log
    tails (a scheduler that failed a task says why only in its own log)."""
    path = f"/api/v2/dags/{DAG_ID}/dagRuns/{run_id}"
    tis = stack.api("GET", f"{path}/taskInstances").json().get("task_instances", [])
    out = [f"run {run_id} conf {_api_run(stack, run_id).get('conf')}"]
    for ti in tis:
        out.append(f"{ti['task_id']}[{ti['map_index']}]: {ti['state']}")
        if ti["state"] == "failed":
            index = f"?map_index={ti['map_index']}" if ti["map_index"] >= 0 else ""
            log = stack.api("GET", f"{path}/taskInstances/{ti['task_id']}/logs/"
                                   f"{ti['try_number']}{index}")
            content = log.json().get("content", []) if log.status_code == 200 else log.text
            out += [str(e.get("event", e)) if isinstance(e, dict) else str(e)
                    for e in content][-30:]
    return "\n".join(out) + "\n" + stack.diagnostics()


# -------------------------------------------------------------------------------------------
# The tests
# -------------------------------------------------------------------------------------------
def test_invalid_channel_fails_the_first_task_with_the_fix(lab: Lab, browser: Any) -> None:
    from selenium.webdriver.common.by import By

    driver, stack = browser, lab.stack
    _fill_form(driver, lab, marker_channel=5, shot="01_form_marker_channel_5.png")
    run_id = _submit(driver, stack)
    assert _final_run_state(driver, stack, run_id) == "Failed"
    _until(driver, stack, "the task table", lambda d: len(_task_states(d)) >= 2)
    SHOTS.save(driver, "02_run_failed.png")
    states = _task_states(driver)
    assert states["check_images"] == "Failed", states
    assert not any(s == "Success" for t, s in states.items() if t.startswith("image.")), (
        f"no cluster step ran for a bad channel: {states}")
    assert _api_run(stack, run_id)["conf"]["marker_channel"] == 5, "the form sent what was typed"

    # the failed task's log, opened from the run's table as a person would
    driver.find_element(By.XPATH, "//td//a[normalize-space()='check_images' and "
                                  "contains(@href, '/runs/')]").click()
    fix = (f"image {lab.image_id} has {len(lab.channels)} channels ({', '.join(lab.channels)}); "
           f"marker_channel=5 is out of range (use 0..{len(lab.channels) - 1})")
    log = _until(driver, stack, "the check_images log to name the fix", lambda d: next(
        (e for e in d.find_elements(By.CSS_SELECTOR, "[data-testid=virtualized-list]")
         if fix in e.text), None))
    assert log.is_displayed()
    SHOTS.save(driver, "03_check_images_log_names_the_fix.png")


def test_valid_run_succeeds_and_its_cluster_jobs_and_log_show(lab: Lab, browser: Any) -> None:
    from selenium.webdriver.common.by import By

    from operators.hpc_step import task_job_key

    driver, stack = browser, lab.stack
    marker = len(lab.channels) - 1
    _fill_form(driver, lab, marker_channel=marker, shot="04_form_valid.png")
    run_id = _submit(driver, stack)
    state = _final_run_state(driver, stack, run_id)
    if state != "Success":
        SHOTS.save(driver, "05_run_not_succeeded.png")
    assert state == "Success", _api_failure(stack, run_id)
    expected = {"check_images", "checked_image_ids", *(f"image.{s}[0]" for s in STEPS)}
    _until(driver, stack, "every task in the table", lambda d: set(_task_states(d)) == expected)
    SHOTS.save(driver, "05_run_succeeded.png")
    states = _task_states(driver)
    assert set(states.values()) == {"Success"}, states
    conf = _api_run(stack, run_id)["conf"]
    assert (conf["image_ids"], conf["dapi_channel"], conf["marker_channel"]) == (
        [lab.image_id], 0, marker), "the run got what the form showed"

    # Browse → HPC jobs (the plugin's page, framed in the UI): one row per cluster job
    driver.find_element(By.CSS_SELECTOR, "[data-testid=nav-sidebar]").find_element(
        By.XPATH, ".//*[normalize-space()='Browse']").click()
    _until(driver, stack, "the HPC jobs menu entry", lambda d: next(
        (e for e in d.find_elements(By.XPATH, "//a[normalize-space()='HPC jobs']")
         if e.is_displayed()), None)).click()
    frame = _until(driver, stack, "the HPC jobs page's frame", lambda d: next(
        (f for f in d.find_elements(By.TAG_NAME, "iframe")
         if "/omeflow/jobs" in (f.get_attribute("src") or "")), None))
    driver.switch_to.frame(frame)
    try:
        keys = {s: task_job_key(DAG_ID, run_id, f"image.{s}", 0, 1) for s in STEPS}
        rows = _until(driver, stack, "a row per cluster job of the run", lambda d: [
            r for k in keys.values()
            for r in d.find_elements(By.CSS_SELECTOR, f"tr[data-job-id='{k}']")])
        assert len(rows) == len(STEPS), f"one row per job: {keys}"
        segment = driver.find_element(By.CSS_SELECTOR,
                                      f"tr[data-job-id='{keys['segment_nuclei']}']")
        driver.execute_script("arguments[0].scrollIntoView({block: 'center'})", segment)
        SHOTS.save(driver, "06_hpc_jobs.png")

        segment.find_element(By.CSS_SELECTOR, "a[href*='/jobs/log']").click()
        seg = stack.api("GET", f"/api/v2/dags/{DAG_ID}/dagRuns/{run_id}/taskInstances/"
                               "image.segment_nuclei/xcomEntries/return_value",
                        params={"map_index": 0, "deserialize": True})
        assert seg.status_code == 200, seg.text
        nuclei = seg.json()["value"]["nuclei"]
        wanted = (f"omeflow: step segment_nuclei job {keys['segment_nuclei']}",
                  f"merge: {nuclei} nuclei", "omeflow: step segment_nuclei finished")
        _until(driver, stack, "the segment_nuclei job's log",
               lambda d: all(w in d.find_element(By.TAG_NAME, "body").text for w in wanted))
        SHOTS.save(driver, "07_job_log.png")
    finally:
        driver.switch_to.default_content()
