"""The review's batches, decision log and queue, on hand-made batches (no models needed):
decide, replace, undo, claims, the queue's order, the CSV export, torn lines, and many
processes appending at once."""

from __future__ import annotations

import csv
import io
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from review_batches import make_batch

from whale_ml.home import HomeLayout
from whale_ml.review import DecisionError, DecisionLog, list_batches, load_batch, review_queue
from whale_ml.review.batches import BatchError
from whale_ml.review.decisions import check_new_id, evidence_of

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def layout(tmp_path: Path) -> HomeLayout:
    return HomeLayout(tmp_path / "home")


def test_a_batch_is_kept_whole_with_its_crops(layout: HomeLayout, tmp_path: Path) -> None:
    batch = make_batch(layout, tmp_path / "tonight", [0.1, -0.2])
    assert [b.id for b in list_batches(layout)] == [batch.id]
    again = load_batch(layout, batch.id)
    assert Path(again.photo(0)["crop_path"]).is_file() and Path(again.photo(0)["crop_path"]).is_relative_to(again.folder)
    assert json.loads((again.folder / "batch.json").read_text())["photos"][0]["crop_path"].startswith("crops/")
    assert again.source_folders == [tmp_path / "tonight"]
    assert not [p for p in (layout.review_dir / "batches").iterdir() if p.name.startswith(".")]  # no staging left
    for bad in ("../../etc", "x", batch.id + "/..", ""):
        with pytest.raises(BatchError):
            load_batch(layout, bad)
    with pytest.raises(BatchError, match="photos 0 to 1"):
        again.photo(2)


def test_decide_replace_undo_and_the_queue(layout: HomeLayout, tmp_path: Path) -> None:
    batch = make_batch(layout, tmp_path / "tonight", [0.3, -0.02, None, 0.01, -0.4])
    log = DecisionLog(layout)
    queue, counts = review_queue(batch, log.current(batch.id))
    # Borderline first (|margin| 0.01, 0.02, 0.3, 0.4), the unreadable photo last.
    assert [e["photo"] for e in queue] == [3, 1, 0, 4, 2]
    assert counts == {"to review": 4, "skipped": 0, "pending": 0, "enrolled": 0, "error": 1, "total": 5}

    with pytest.raises(DecisionError, match="reviewer"):
        log.decide(batch, 3, "confirm", "  ", "a")
    with pytest.raises(DecisionError, match="only be skipped"):
        log.decide(batch, 2, "confirm", "ana", "a")
    log.decide(batch, 3, "confirm", "ana", "a", evidence_of(batch, 3, "confirm", "a"))
    log.decide(batch, 1, "new", "ben", "new-whale-1")
    log.decide(batch, 1, "skip", "ben")  # replaces ben's decision on photo 1
    current = log.current(batch.id)
    assert {p: (d.action, d.reviewer) for p, d in current.items()} == {3: ("confirm", "ana"), 1: ("skip", "ben")}
    assert current[3].evidence["chosen_rank"] == 1 and current[3].evidence["threshold"] == 0.5
    _, counts = review_queue(batch, current)
    assert (counts["to review"], counts["skipped"], counts["pending"]) == (2, 1, 1)

    undone = log.undo(batch, "ben")  # ben's latest: the skip; his "new" stands again
    assert undone.action == "skip"
    assert log.current(batch.id)[1].action == "new"
    log.undo(batch, "ben")
    assert 1 not in log.current(batch.id)
    with pytest.raises(DecisionError, match="no decision"):
        log.undo(batch, "ben")


def test_claimed_and_enrolled_decisions_cannot_be_taken_back(layout: HomeLayout, tmp_path: Path) -> None:
    batch = make_batch(layout, tmp_path / "tonight", [0.1, 0.2, 0.3])
    log = DecisionLog(layout)
    log.decide(batch, 0, "confirm", "ana", "a")
    log.decide(batch, 1, "skip", "ana")
    claim, taken = log.claim(batch, "ana")
    assert [d.photo for d in taken] == [0]  # a skip is not enrolled
    assert log.claim(batch, "ben")[1] == []  # nothing left for a second enrolment
    with pytest.raises(DecisionError, match="being enrolled"):
        log.decide(batch, 0, "new", "ana", "x")
    log.settle(claim, None, "ana", error="disk full")  # failed: pending again
    claim, taken = log.claim(batch, "ana")
    assert [d.photo for d in taken] == [0]
    log.settle(claim, "v0002", "ana")
    assert log.current(batch.id)[0].enrolled_in == "v0002"
    log.undo(batch, "ana")  # ana's latest is the skip: undone
    with pytest.raises(DecisionError, match="enrolled in gallery v0002"):
        log.undo(batch, "ana")

    rows = list(csv.DictReader(io.StringIO(log.export_csv(batch.id))))
    assert [(r["photo"], r["action"], r["reviewer"], r["undone"], r["enrolled_in"]) for r in rows] == [
        ("0", "confirm", "ana", "false", "v0002"),
        ("1", "skip", "ana", "true", ""),
    ]
    assert rows[0]["path"].endswith("p0.jpg") and rows[0]["gallery_version"] == ""  # no evidence given here


def test_a_claim_whose_process_died_releases_its_decisions(layout: HomeLayout, tmp_path: Path) -> None:
    batch = make_batch(layout, tmp_path / "tonight", [0.1])
    log = DecisionLog(layout)
    log.decide(batch, 0, "confirm", "ana", "a")
    code = f"""
        from whale_ml.home import HomeLayout
        from whale_ml.review import DecisionLog, load_batch
        from pathlib import Path
        layout = HomeLayout(Path({str(layout.home)!r}))
        print(DecisionLog(layout).claim(load_batch(layout, {batch.id!r}), "ghost")[0])
    """
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], check=False, cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    decision = log.current(batch.id)[0]
    assert decision.claimed_by is None and decision.pending  # its enrolment's process is gone


def test_a_torn_last_line_is_skipped_and_the_next_append_starts_afresh(layout: HomeLayout, tmp_path: Path) -> None:
    batch = make_batch(layout, tmp_path / "tonight", [0.1, 0.2])
    log = DecisionLog(layout)
    log.decide(batch, 0, "skip", "ana")
    with open(log.path, "a") as f:
        f.write('{"kind": "decision", "id": "torn')  # a crash mid-write
    log.decide(batch, 1, "skip", "ana")
    assert sorted(log.current(batch.id)) == [0, 1]


def test_new_ids_are_checked() -> None:
    assert check_new_id("  whale-42 ", {"a"}) == "whale-42"
    for bad, why in (("", "give"), ("two words", "spaces"), ("new_individual", "not an identity"), ("a", "already")):
        with pytest.raises(DecisionError, match=why):
            check_new_id(bad, {"a"})


def test_reviewers_in_many_processes_lose_no_decision(layout: HomeLayout, tmp_path: Path) -> None:
    """Four processes decide on 20 photos each at once, on one log: every line whole, all 80 kept."""
    batch = make_batch(layout, tmp_path / "tonight", [0.01 * i for i in range(20)])
    code = """
        import sys
        from whale_ml.home import HomeLayout
        from whale_ml.review import DecisionLog, load_batch
        from pathlib import Path
        layout = HomeLayout(Path(sys.argv[1]))
        batch, log = load_batch(layout, sys.argv[2]), DecisionLog(layout)
        for photo in range(20):
            log.decide(batch, photo, "confirm", sys.argv[3], "a", {"pad": "x" * 3000})
    """
    procs = [
        subprocess.Popen([sys.executable, "-c", textwrap.dedent(code), str(layout.home), batch.id, f"r{i}"], cwd=REPO) for i in range(4)
    ]
    assert [p.wait(timeout=120) for p in procs] == [0] * 4
    log = DecisionLog(layout)
    lines = log.path.read_text().splitlines()
    assert len(lines) == 80 and all(json.loads(line)["kind"] == "decision" for line in lines)
    assert {d.reviewer for d in log.decisions(batch.id)} == {f"r{i}" for i in range(4)}


def test_an_enrolment_refuses_a_new_id_the_gallery_already_holds(layout: HomeLayout, tmp_path: Path) -> None:
    import pandas as pd

    from whale_ml.review.enrol import new_ids_taken

    batch = make_batch(layout, tmp_path / "tonight", [0.1, 0.2])
    log = DecisionLog(layout)
    log.decide(batch, 0, "new", "ana", "zed")
    log.decide(batch, 1, "new", "ana", "fresh-1")
    catalogue = pd.DataFrame({"image": ["g.jpg"], "individual_id": ["zed"], "species": ["beluga"]})
    problems = new_ids_taken(list(log.current(batch.id).values()), catalogue)
    assert len(problems) == 1 and "p0.jpg" in problems[0] and "already holds zed" in problems[0]
