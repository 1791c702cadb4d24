"""The review app over hand-made batches (no models): pages render with every id and file
name escaped, decisions go through the API with their errors named, the export, and the
image route's refusals. The browser, enrolment and real servers: tests/test_review.py."""

from __future__ import annotations

import csv
import io
import re
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from review_batches import make_batch

from whale_assets.review.app import create_app
from whale_ml.home import HomeLayout
from whale_ml.review import DecisionLog

HOSTILE_ID = '"><script>window.pwned=1</script>'
HOSTILE_NAME = "<img src=x onerror=alert(1)>.jpg"


def _no_enrol(batch, reviewer):  # type: ignore[no-untyped-def]
    raise AssertionError("these tests do not enrol")


@pytest.fixture
def app(tmp_path: Path):  # type: ignore[no-untyped-def]
    layout = HomeLayout(tmp_path / "home")
    batch = make_batch(layout, tmp_path / "tonight", [0.2, -0.01, None], ids=[HOSTILE_ID, "b", "c", "d", "e"], names=[HOSTILE_NAME, "q.jpg", "r.jpg"])
    return TestClient(create_app(layout, _no_enrol)), batch, layout, tmp_path


def test_pages_escape_every_id_and_file_name(app) -> None:  # type: ignore[no-untyped-def]
    client, batch, _, _ = app
    index = client.get("/")
    assert index.status_code == 200 and batch.id in index.text
    page = client.get(f"/batch/{batch.id}", follow_redirects=False)
    assert page.status_code == 303 and page.headers["location"].endswith("?photo=1")  # the most borderline first
    page = client.get(f"/batch/{batch.id}?photo=0")
    assert page.status_code == 200
    assert HOSTILE_ID not in page.text and HOSTILE_NAME not in page.text
    assert "&lt;script&gt;window.pwned=1&lt;/script&gt;" in page.text and "&lt;img src=x onerror=alert(1)&gt;.jpg" in page.text
    assert not re.search(r"<script>(?!\s*$)", page.text)  # no inline script at all: one file, from the app
    assert re.findall(r'(?:src|href)="(https?:)?//', page.text) == []  # nothing from another host
    assert client.get("/static/review.js").status_code == 200 and client.get("/static/review.css").status_code == 200


def test_decisions_through_the_api_and_the_export(app) -> None:  # type: ignore[no-untyped-def]
    client, batch, layout, _ = app
    url = f"/api/batch/{batch.id}"
    assert client.post(f"{url}/decide", json={"photo": 1, "action": "confirm", "individual_id": "b", "reviewer": ""}).json()["error"].startswith("enter your name")
    refused = client.post(f"{url}/decide", json={"photo": 1, "action": "confirm", "individual_id": "zz", "reviewer": "ana"})
    assert refused.status_code == 400 and "not a candidate" in refused.json()["error"]
    taken = client.post(f"{url}/decide", json={"photo": 1, "action": "new", "individual_id": "b", "reviewer": "ana"})
    assert taken.status_code == 400 and "already in the gallery" in taken.json()["error"]
    ok = client.post(f"{url}/decide", json={"photo": 1, "action": "confirm", "individual_id": "b", "reviewer": "ana"})
    assert ok.status_code == 200 and ok.json()["next"] == 0 and ok.json()["decision"]["reviewer"] == "ana"
    ok = client.post(f"{url}/decide", json={"photo": 0, "action": "new", "individual_id": "whale-9", "reviewer": "ana"})
    assert ok.json()["next"] is None  # the third photo could not be identified: nothing left to review
    assert client.post(f"{url}/decide", json={"photo": 9, "action": "skip", "reviewer": "ana"}).status_code == 400
    assert client.post(f"{url}/undo", json={"reviewer": "ana"}).json()["next"] == 0
    assert {p: d.action for p, d in DecisionLog(layout).current(batch.id).items()} == {1: "confirm"}

    export = client.get(f"/batch/{batch.id}/decisions.csv")
    assert export.status_code == 200 and export.headers["content-type"].startswith("text/csv")
    rows = list(csv.DictReader(io.StringIO(export.text)))
    assert [(r["image"], r["action"], r["individual_id"], r["undone"]) for r in rows] == [("q.jpg", "confirm", "b", "false"), (HOSTILE_NAME, "new", "whale-9", "true")]
    assert rows[0]["chosen_rank"] == "2" and rows[0]["threshold"] == "0.5" and rows[0]["machine_decision"] == "new_individual"


def test_images_only_from_the_home_and_the_batch_folders(app) -> None:  # type: ignore[no-untyped-def]
    client, batch, layout, tmp_path = app
    photo = batch.photo(1)["path"]
    assert client.get("/file", params={"path": photo, "batch": batch.id}).headers["content-type"] == "image/jpeg"
    assert client.get("/file", params={"path": batch.photo(1)["crop_path"]}).status_code == 200  # under the home
    outside = tmp_path / "elsewhere.jpg"
    outside.write_bytes(Path(photo).read_bytes())
    (layout.home / "link.jpg").symlink_to(outside)
    (layout.home / "notes.txt").write_text("not an image")
    for path in (photo, str(outside), "/etc/passwd", f"{layout.home}/../elsewhere.jpg", str(layout.home / "link.jpg"), str(layout.home / "notes.txt")):
        assert client.get("/file", params={"path": path}).status_code == 403, path
    assert client.get("/file", params={"path": str(outside), "batch": batch.id}).status_code == 403
    assert client.get("/file", params={"path": photo, "batch": "../../etc"}).status_code == 404
    assert client.get("/batch/x/photo/0/matches/1.jpg").status_code == 404
