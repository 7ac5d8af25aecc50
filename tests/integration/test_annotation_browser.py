"""The annotation page in a real browser: Debian's ``chromium`` + ``chromium-driver`` with
Selenium (headless, 1400 x 900), against the api-server of ``test_annotation_page.py``
(the same stack, started once).

Logs in through the Airflow login page (admin and the password ``scripts/ui.py`` printed),
opens the page of a candidate set, labels ten candidates with the keyboard, undoes the last
one, and then the annotation store holds exactly those nine labels; a second annotator's
labels then show as agreement. Screenshots (set list, a candidate, progress, the grid,
agreement) go to ``$OMEFLOW_ARTIFACTS/annotation/`` (default ``var/artifacts/``; paths
printed).
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.browser import Screenshots, chromium, fits, login
from tests.integration.test_annotation_page import AnnotationUi, annotation_ui  # noqa: F401

pytestmark = pytest.mark.slow

SHOTS = Screenshots("annotation")
WAIT_S = 30
#: The keys pressed, in order, and the label each one stands for.
KEYS = [("1", "positive"), ("2", "negative"), ("3", "unsure"), ("p", "positive"),
        ("n", "negative"), ("u", "unsure"), ("2", "negative"), ("n", "negative"),
        ("1", "positive"), ("3", "unsure")]


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    with chromium() as driver:
        yield driver


def test_label_ten_with_the_keyboard_undo_one(
    annotation_ui: AnnotationUi, browser: object  # noqa: F811
) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    ui, driver = annotation_ui, browser
    set_id = ui.sets["browser"]
    wait = WebDriverWait(driver, WAIT_S)
    login(driver, ui.stack.base_url, ui.passwords["admin"])

    driver.get(f"{ui.stack.base_url}/omeflow/annotate")  # type: ignore[attr-defined]
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, f"a[href='annotate?set={set_id}']"))
    SHOTS.save(driver, "0_sets.png")
    driver.find_element(By.CSS_SELECTOR, f"a[href='annotate?set={set_id}']").click()  # type: ignore
    wait.until(lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-ready"))

    def shown() -> int:
        """The id of the candidate the page shows (its meta line), once images loaded."""
        wait.until(lambda d: not d.find_element(By.TAG_NAME, "body").get_attribute("data-busy"))
        wait.until(lambda d: d.execute_script(
            "return [...document.querySelectorAll('#single img')].every(i => i.complete "
            "&& i.naturalWidth > 0)"))
        meta = driver.find_element(By.ID, "cand-meta").text  # type: ignore[attr-defined]
        return int(meta.split()[1])

    body = driver.find_element(By.TAG_NAME, "body")  # type: ignore[attr-defined]
    pressed: dict[int, str] = {}
    for i, (key, label) in enumerate(KEYS):
        cid = shown()
        assert cid not in pressed, f"candidate {cid} served twice"
        if i == 3:
            SHOTS.save(driver, "1_candidate.png")
            assert fits(driver), "the single view must fit a 1400 x 900 screen without scrolling"
        body.send_keys(key)
        wait.until(lambda d, cid=cid: shown() != cid)
        pressed[cid] = label
    last = list(pressed)[-1]
    body.send_keys("z")  # undo the last label: the page goes back to that candidate
    wait.until(lambda d: shown() == last)
    wait.until(lambda d: "Undone" in d.find_element(By.ID, "message").text)
    del pressed[last]
    wait.until(lambda d: "9 / 30 candidates labelled" in d.find_element(By.ID, "progress").text)
    SHOTS.save(driver, "2_after_undo_progress.png")

    stored = {r["candidate_id"]: r["label"]
              for r in ui.store.labels(set_id=set_id, annotator="admin")}
    assert stored == pressed, "the store holds exactly the labels given with the keyboard"
    assert {r["annotator"] for r in ui.store.labels(set_id=set_id)} == {"admin"}
    history = ui.store.labels(set_id=set_id, history=True)
    assert len(history) == 10 and sum(r["undone_at"] is not None for r in history) == 1

    # grid mode: 4 x 4 crops, mark three with the keyboard (not saved: Esc leaves)
    body.send_keys("g")
    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#grid-tiles .tile")) == 16)
    wait.until(lambda d: d.execute_script(
        "return [...document.querySelectorAll('#grid-tiles img')].every(i => i.complete "
        "&& i.naturalWidth > 0)"))
    for key in (" ", Keys.ARROW_RIGHT, " ", Keys.ARROW_DOWN, " "):
        body.send_keys(key)
    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#grid-tiles .tile.marked")) == 3)
    SHOTS.save(driver, "3_grid.png")
    assert fits(driver), "the 4 x 4 grid must fit a 1400 x 900 screen without scrolling"
    body.send_keys(Keys.ESCAPE)
    wait.until(lambda d: d.find_element(By.ID, "grid").get_attribute("hidden") is not None)
    assert {r["candidate_id"]: r["label"]
            for r in ui.store.labels(set_id=set_id, annotator="admin")} == pressed

    # a second annotator labels the same candidates: the page shows their agreement
    for n, cid in enumerate(pressed):
        reply = ui.call("POST", f"/omeflow/annotate/api/candidates/{cid}/label", user="alice",
                        headers={"X-Omeflow-Request": "1"},
                        json={"label": "negative" if n % 3 else pressed[cid]})
        assert reply.status_code == 200, reply.text
    driver.refresh()  # type: ignore[attr-defined]
    wait.until(lambda d: "admin × alice" in d.find_element(By.ID, "agreement-table").text
               or "alice × admin" in d.find_element(By.ID, "agreement-table").text)
    SHOTS.save(driver, "4_agreement.png")
    text = driver.find_element(By.ID, "agreement-table").text  # type: ignore[attr-defined]
    [row] = ui.store.agreement(set_id=set_id)
    assert f"{row['agree']} / {row['n']} agree" in text, text
