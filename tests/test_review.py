"""`whale review` on a real tiny pipeline run, driven in headless Chromium: a batch kept by
`whale identify`, one candidate confirmed by clicking and one new individual marked by
keyboard, both enrolled as one gallery version with the reviewer recorded, and the next
`whale identify` ranking the new animal; two reviewers on two servers enrolling at once;
hostile names shown as text; files outside the home refused."""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
import subprocess
import sys
import threading
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import dagster as dg
import pandas as pd
import pytest
from chromium import SKIP_REASON, ChromiumPage, browser
from encounter import encounter
from health import stop_group, wait_healthy

from whale_assets.cli import main as whale
from whale_assets.instance import prepare_dagster_home
from whale_assets.run import load_recipe, run_pipeline
from whale_ml.gallery import list_versions, load_version, read_ledger
from whale_ml.home import HomeLayout
from whale_ml.identify import write_report
from whale_ml.review import DecisionLog, list_batches, load_batch

pytestmark = [pytest.mark.e2e, pytest.mark.server]

REPO = Path(__file__).resolve().parent.parent
NEW_ID = "whale-new-7"
needs_browser = pytest.mark.skipif(browser() is None, reason=SKIP_REASON)


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory, tiny_data: Path) -> Iterator[dict[str, Any]]:
    """One real pipeline run on the tiny set."""
    root = tmp_path_factory.mktemp("review")
    home = root / "home"
    env = {"WHALE_HOME": str(home), "WHALE_DATA_DIR": str(tiny_data), "DAGSTER_HOME": str(home / "dagster_home")}
    with pytest.MonkeyPatch.context() as mp:
        for k, v in env.items():
            mp.setenv(k, v)
        mp.setenv("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
        prepare_dagster_home()
        run_pipeline(load_recipe(REPO / "configs" / "tiny.yaml"), log=lambda _msg: None)
        yield {"home": home, "layout": HomeLayout(home), "data": tiny_data, "root": root, "env": env}


def _identify(capsys: pytest.CaptureFixture[str], *photos: Path) -> dict[str, Any]:
    capsys.readouterr()
    assert whale(["identify", *map(str, photos), "--json", "--no-progress"]) == 0
    return json.loads(capsys.readouterr().out)


class Server:
    """``whale review`` in its own process group on 127.0.0.1."""

    def __init__(self, home: dict[str, Any], port: int, log: Path) -> None:
        self.url = f"http://127.0.0.1:{port}"
        self.log = log
        env = {**os.environ, **home["env"], "PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "whale_assets.cli", "review", "--port", str(port)],
            cwd=REPO, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
        wait_healthy(self.url, log, proc=self.proc)

    def post(self, path: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        req = urllib.request.Request(self.url + path, json.dumps(body).encode(), {"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=300) as resp:
                return resp.status, json.loads(resp.read())
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read() or b"{}")

    def get(self, path: str) -> tuple[int, bytes]:
        try:
            with urllib.request.urlopen(self.url + path, timeout=120) as resp:
                return resp.status, resp.read()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read()

    def stop(self) -> None:
        stop_group(self.proc, timeout=20)


@pytest.fixture
def server(home: dict[str, Any], free_port, tmp_path: Path) -> Iterator[Server]:  # type: ignore[no-untyped-def]
    s = Server(home, free_port(), tmp_path / "review.log")
    yield s
    s.stop()


def _known_test_photos(home: dict[str, Any]) -> list[Path]:
    truth = pd.read_csv(home["data"] / "test_truth.csv", dtype=str)
    known = truth[truth["individual_id"] != "new_individual"]
    return [home["data"] / "test_images" / name for name in known["image"]]


def _gallery_images(layout: HomeLayout) -> dict[str, str]:
    g = load_version(layout.in_round(None))
    return dict(zip(g.table["image"], g.table["individual_id"], strict=True))


@needs_browser
def test_review_confirm_by_click_new_by_keyboard_enrol_and_identify_again(
    home: dict[str, Any], server: Server, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    layout = home["layout"]
    frames = encounter(home["root"] / "tonight", n=4, animal=NEW_ID, seed=991)
    known = _known_test_photos(home)[:3]
    result = _identify(capsys, frames[0], *known)
    batch_id = result["batch"]
    assert [b.id for b in list_batches(layout)][0] == batch_id
    versions_before = list_versions(layout)["version"].tolist()
    confirm_row = 1  # a known animal's photo: confirm its first candidate
    confirm_id = result["photos"][confirm_row]["candidates"][0]["individual_id"]

    with ChromiumPage(tmp_path / "profile", width=1280, height=1000) as page:
        page.goto(f"{server.url}/")
        page.click(f"a.batch-link[href='/batch/{batch_id}']")
        page.wait_for("document.querySelector('#queue') !== null")
        assert page.evaluate("document.querySelectorAll('#queue li').length") == 4
        page.type("#reviewer", "Ana")

        # The new animal by keyboard: its id typed, then N.
        page.goto(f"{server.url}/batch/{batch_id}?photo=0")
        page.type("#new-id", NEW_ID, clear=True)
        page.press("Escape")  # out of the text field: the shortcuts apply again
        page.press("n")
        page.wait_for("!location.search.endsWith('photo=0') || document.querySelector('#decision') !== null")

        # A known animal by clicking its first candidate's button.
        page.goto(f"{server.url}/batch/{batch_id}?photo={confirm_row}")
        page.wait_for("document.querySelector('#confirm-1') !== null")
        assert page.evaluate("document.querySelector('#confirm-1').dataset.individual") == confirm_id
        page.click("#confirm-1")
        page.wait_for(f"!location.search.endsWith('photo={confirm_row}')")
        assert "waiting to enrol: 2" in page.text("#counts")

        # Both enrolled as one version, by the keyboard's E.
        page.press("e")
        page.wait_for("/gallery v\\d{4}: 2 photo/.test(document.querySelector('#status').innerText)", timeout=240)
        assert "enrolled: 2" in page.text("#counts")
        page.screenshot(tmp_path / "review.png")
        assert page.console_errors == [] and page.failed_requests == []

    versions = list_versions(layout)
    assert len(versions) == len(versions_before) + 1 and versions.iloc[-1]["made_by"] == "whale enroll"
    gallery = _gallery_images(layout)
    assert gallery[frames[0].name] == NEW_ID and gallery[known[0].name] == confirm_id
    ledger = read_ledger(layout)
    assert set(ledger["image"]) >= {frames[0].name, known[0].name}
    # The Dagster UI's gallery asset shows the version, as after `whale enroll`.
    mat = dg.DagsterInstance.get().get_latest_materialization_event(dg.AssetKey("gallery")).asset_materialization
    assert mat.metadata["version"].value == versions.iloc[-1]["version"] and mat.metadata["enrolled_now"].value == 2

    # Each decision is kept with who took it, when, and the evidence shown; the export lists them.
    decisions = {d.image: d for d in DecisionLog(layout).decisions(batch_id)}
    new, confirmed = decisions[frames[0].name], decisions[known[0].name]
    assert (new.action, new.individual_id, new.reviewer) == ("new", NEW_ID, "Ana")
    assert (confirmed.action, confirmed.individual_id, confirmed.reviewer) == ("confirm", confirm_id, "Ana")
    assert new.enrolled_in == confirmed.enrolled_in == versions.iloc[-1]["version"]
    assert confirmed.evidence["chosen_rank"] == 1 and confirmed.evidence["gallery_version"] == result["gallery"]["version"]
    assert [c["individual_id"] for c in confirmed.evidence["candidates"]] == [c["individual_id"] for c in result["photos"][1]["candidates"]]
    code, body = server.get(f"/batch/{batch_id}/decisions.csv")
    rows = {r["image"]: r for r in csv.DictReader(io.StringIO(body.decode()))}
    assert code == 200 and rows[frames[0].name]["reviewer"] == "Ana" and rows[known[0].name]["enrolled_in"] == new.enrolled_in

    # The report, for sharing the batch as one file, shows the same scores as the page.
    report = write_report(load_batch(layout, batch_id).data, tmp_path / "report.html").read_text()
    code, page_html = server.get(f"/batch/{batch_id}?photo={confirm_row}")
    for c in result["photos"][confirm_row]["candidates"]:
        assert f"{c['similarity']:.4f}" in page_html.decode() and f"{c['similarity']:.4f}" in report

    # The next identify of another photo of the new animal ranks it.
    again = _identify(capsys, frames[2])
    assert NEW_ID in [c["individual_id"] for c in again["photos"][0]["candidates"]]
    assert again["photos"][0]["candidates"][0]["individual_id"] == NEW_ID


def test_two_reviewers_on_two_servers_enrol_at_once_and_both_land(
    home: dict[str, Any], free_port, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    layout = home["layout"]
    photos = _known_test_photos(home)[3:5]
    result = _identify(capsys, *photos)
    batch_id = result["batch"]
    servers = [Server(home, free_port(), tmp_path / f"review{i}.log") for i in range(2)]
    try:
        for i, (s, who) in enumerate(zip(servers, ("Ben", "Cy"), strict=True)):
            ind = result["photos"][i]["candidates"][0]["individual_id"]
            assert s.post(f"/api/batch/{batch_id}/decide", {"photo": i, "action": "confirm", "individual_id": ind, "reviewer": who})[0] == 200
        answers: list[tuple[int, dict[str, Any]]] = [None, None]  # type: ignore[list-item]
        start = threading.Barrier(2)

        def enrol(i: int) -> None:
            start.wait()
            answers[i] = servers[i].post(f"/api/batch/{batch_id}/enrol", {"reviewer": ("Ben", "Cy")[i]})

        workers = [threading.Thread(target=enrol, args=(i,)) for i in range(2)]
        for w in workers:
            w.start()
        for w in workers:
            w.join(timeout=400)
        assert [a[0] for a in answers] == [200, 200], answers
        assert sum(a[1]["enrolled"] for a in answers) == 2  # one enrolment took both, or each its own
    finally:
        for s in servers:
            s.stop()
    gallery = _gallery_images(layout)
    assert all(p.name in gallery for p in photos)
    assert all(d.enrolled_in for d in DecisionLog(layout).decisions(batch_id))
    assert {d.reviewer for d in DecisionLog(layout).decisions(batch_id)} == {"Ben", "Cy"}


@needs_browser
def test_hostile_names_are_shown_as_text_and_files_outside_are_refused(
    home: dict[str, Any], server: Server, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    hostile_name = '<img src=x onerror="window.pwned=1">.jpg'
    folder = home["root"] / "hostile"
    folder.mkdir()
    shutil.copyfile(_known_test_photos(home)[5], folder / hostile_name)
    result = _identify(capsys, folder / hostile_name)
    batch_id = result["batch"]
    hostile_id = "<svg/onload=window.pwned=2>"

    with ChromiumPage(tmp_path / "profile") as page:
        page.goto(f"{server.url}/batch/{batch_id}?photo=0")
        page.type("#reviewer", "Dee")
        assert page.text("#image-name") == hostile_name
        assert hostile_name in page.text("#queue")
        page.type("#new-id", hostile_id, clear=True)
        page.click("#new-individual")
        page.wait_for("document.querySelector('#decision') !== null")
        assert hostile_id in page.text("#decision") and hostile_id in page.text("#queue")
        assert page.evaluate("window.pwned === undefined && document.querySelector('svg, img[src=x]') === null")
        page.goto(f"{server.url}/")
        assert page.evaluate("window.pwned === undefined")

    # Files: under the home, or the batch's own photo folders (only with the batch named).
    outside = tmp_path / "secret.jpg"
    shutil.copyfile(folder / hostile_name, outside)
    (home["home"] / "link.jpg").unlink(missing_ok=True)
    (home["home"] / "link.jpg").symlink_to(outside)
    q = urllib.parse.quote
    assert server.get(f"/file?path={q(str(folder / hostile_name))}&batch={batch_id}")[0] == 200
    for path in (str(folder / hostile_name), str(outside), "/etc/passwd", f"{home['home']}/../../{outside.relative_to('/')}", str(home["home"] / "link.jpg")):
        code, _ = server.get(f"/file?path={q(path)}")
        assert code == 403, path
    assert server.get(f"/file?path={q(str(outside))}&batch={batch_id}")[0] == 403
    assert server.get("/batch/..%2F..%2Fetc")[0] == 404
    assert server.post("/api/batch/not-a-batch/decide", {"photo": 0, "action": "skip", "reviewer": "x"})[0] == 404
