"""The reviewers' decisions: one append-only log per home, safe with many writers.

Every action on the review page is one JSON line of ``review/decisions.jsonl``:

* ``confirm`` (a candidate is the animal), ``new`` (a new individual, with its new id),
  ``skip``: who, when, on which photo of which batch, and the evidence the page showed
  (the gallery version, the threshold, every candidate's score and parts);
* ``undo``: takes back a reviewer's latest decision that is not enrolled yet;
* ``claim``, then ``enrolled`` or ``released``: an enrolment taking the pending
  decisions of a batch, and its outcome (the gallery version they joined).

Lines are appended under ``flock`` on ``review/decisions.lock``, each in one ``write``,
so reviewers in several processes (one server each, or one server's threads) never
interleave or lose a line; a reader skips a last line a crash left torn. The state of a
photo is folded from the log: its latest decision that no ``undo`` took back. A decision
taken by an enrolment in progress (``claim``) cannot be undone or replaced; a claim whose
process is gone counts as released.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import socket
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from whale_ml.data.metadata import NEW_INDIVIDUAL
from whale_ml.gallery.catalogue import file_lock
from whale_ml.home import HomeLayout
from whale_ml.io import fsync_file, pid_alive, write_error
from whale_ml.review.batches import Batch

ACTIONS = ("confirm", "new", "skip")
LOG_FILE = "decisions.jsonl"
LOCK_FILE = "decisions.lock"
MAX_REVIEWER = 80


class DecisionError(ValueError):
    """A decision the log refuses (the message says why, for the reviewer)."""


@dataclass
class Decision:
    """A reviewer's decision on one photo of a batch, as the log folds it."""

    id: str
    batch: str
    photo: int
    image: str
    action: str  # confirm | new | skip
    individual_id: str  # "" for skip
    reviewer: str
    at: str
    evidence: dict[str, Any] = field(default_factory=dict)
    undone: bool = False
    claimed_by: str | None = None  # an enrolment in progress (its claim's id)
    enrolled_in: str | None = None  # the gallery version it joined

    @property
    def pending(self) -> bool:
        """A confirm or new individual waiting to be enrolled."""
        return self.action in ("confirm", "new") and not self.undone and self.enrolled_in is None


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def check_reviewer(name: str) -> str:
    """The reviewer's name, stripped.

    Raises:
        DecisionError: empty, too long, or with control characters.
    """
    name = (name or "").strip()
    if not name:
        raise DecisionError("enter your name as reviewer first: every decision is kept with who took it")
    if len(name) > MAX_REVIEWER or any(ord(c) < 32 or ord(c) == 127 for c in name):
        raise DecisionError(f"a reviewer name is at most {MAX_REVIEWER} printable characters")
    return name


def check_new_id(individual_id: str, known: set[str]) -> str:
    """A new individual's id: no whitespace (the submission separates ids by spaces), not
    ``new_individual``, not an individual the gallery knows.

    Raises:
        DecisionError: naming the problem.
    """
    ind = (individual_id or "").strip()
    if not ind:
        raise DecisionError("give the new individual an id")
    if any(c.isspace() or ord(c) < 32 or ord(c) == 127 for c in ind):
        raise DecisionError(f"an individual id has no spaces or control characters: {ind!r}")
    if ind == NEW_INDIVIDUAL:
        raise DecisionError(f"'{NEW_INDIVIDUAL}' is not an identity: give the new animal an id")
    if ind in known:
        raise DecisionError(f"{ind} is already in the gallery: confirm it as a candidate instead")
    return ind


def propose_id(batch: Batch, photo: int) -> str:
    """A new id for the animal of a photo, unique by construction: ``new-<batch time>-<photo>-<4 hex>``."""
    return f"new-{batch.id.split('-')[0].lower()}-{photo:03d}-{uuid.uuid4().hex[:4]}"


class DecisionLog:
    """The home's decision log (see the module's docstring)."""

    def __init__(self, layout: HomeLayout) -> None:
        self.folder = layout.review_dir
        self.path = self.folder / LOG_FILE

    # ------------------------------------------------------------------ writing

    def locked(self) -> contextlib.AbstractContextManager[None]:
        """Hold the log's lock: a read-check-append is then one step for every process."""
        return file_lock(self.folder / LOCK_FILE)

    def _append(self, records: Sequence[dict[str, Any]]) -> None:
        """Append ``records`` in one write (the caller holds :meth:`locked`)."""
        data = "".join(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n" for r in records).encode()
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o666)
            try:
                # A torn last line (a crash mid-write) would swallow the first of these.
                if os.fstat(fd).st_size and os.pread(fd, 1, os.fstat(fd).st_size - 1) != b"\n":
                    os.write(fd, b"\n")
                os.write(fd, data)
            finally:
                os.close(fd)
            fsync_file(self.path)
        except OSError as exc:
            raise write_error(self.path, exc) from exc

    def records(self) -> list[dict[str, Any]]:
        """Every whole line of the log, in order (a torn or garbled line is skipped)."""
        try:
            text = self.path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return []
        out = []
        for line in text.splitlines():
            with contextlib.suppress(ValueError):
                record = json.loads(line)
                if isinstance(record, dict) and "kind" in record:
                    out.append(record)
        return out

    # ------------------------------------------------------------------ folding

    def decisions(self, batch: str | None = None, records: list[dict[str, Any]] | None = None) -> list[Decision]:
        """Every decision (of ``batch``), in the order taken, with undos, claims and enrolments applied."""
        records = self.records() if records is None else records
        by_id: dict[str, Decision] = {}
        live_claims: dict[str, list[str]] = {}
        for r in records:
            kind = r["kind"]
            if kind == "decision":
                if batch is None or r["batch"] == batch:
                    by_id[r["id"]] = Decision(
                        r["id"], r["batch"], int(r["photo"]), r["image"], r["action"], r.get("individual_id", ""), r["reviewer"], r["at"],
                        r.get("evidence") or {},
                    )
            elif kind == "undo" and r["undoes"] in by_id:
                by_id[r["undoes"]].undone = True
            elif kind == "claim":
                live_claims[r["id"]] = list(r["decisions"])
                if not (r.get("host") == socket.gethostname() and not pid_alive(int(r.get("pid", 0)))):
                    for d in r["decisions"]:
                        if d in by_id:
                            by_id[d].claimed_by = r["id"]
            elif kind in ("enrolled", "released"):
                for d in live_claims.pop(r["claim"], []):
                    if d in by_id:
                        by_id[d].claimed_by = None
                        if kind == "enrolled":
                            by_id[d].enrolled_in = r["version"]
        return list(by_id.values())

    def current(self, batch: str, records: list[dict[str, Any]] | None = None) -> dict[int, Decision]:
        """Each photo's standing decision: its latest that no undo took back."""
        out: dict[int, Decision] = {}
        for d in self.decisions(batch, records):
            if not d.undone:
                out[d.photo] = d
        return out

    # ------------------------------------------------------------------ acting

    def decide(
        self, batch: Batch, photo: int, action: str, reviewer: str, individual_id: str = "", evidence: dict[str, Any] | None = None
    ) -> Decision:
        """Record a decision on photo ``photo`` of ``batch``; it replaces the photo's standing one.

        Raises:
            DecisionError: an unknown action, no reviewer, a photo that could not be
                identified, or one whose standing decision is enrolled or being enrolled.
        """
        if action not in ACTIONS:
            raise DecisionError(f"unknown action {action!r}: one of {', '.join(ACTIONS)}")
        reviewer = check_reviewer(reviewer)
        row = batch.photo(photo)
        if row.get("status") != "ok" and action != "skip":
            raise DecisionError(f"{row['image']} could not be identified ({row.get('error')}): it can only be skipped")
        record = {
            "kind": "decision",
            "id": uuid.uuid4().hex,
            "batch": batch.id,
            "photo": photo,
            "image": row["image"],
            "path": row["path"],
            "action": action,
            "individual_id": individual_id if action != "skip" else "",
            "reviewer": reviewer,
            "at": _now(),
            "evidence": evidence or {},
        }
        with self.locked():
            standing = self.current(batch.id).get(photo)
            if standing is not None:
                _refuse_if_taken(standing, "replace")
            self._append([record])
        # The decision as the log will fold it (nothing can claim it before it is read back).
        return Decision(
            record["id"], batch.id, photo, row["image"], action, record["individual_id"], reviewer, record["at"], record["evidence"]
        )

    def undo(self, batch: Batch, reviewer: str) -> Decision:
        """Take back ``reviewer``'s latest standing decision in ``batch``.

        Raises:
            DecisionError: none to take back, or it is enrolled or being enrolled.
        """
        reviewer = check_reviewer(reviewer)
        with self.locked():
            mine = [d for d in self.decisions(batch.id) if d.reviewer == reviewer and not d.undone]
            if not mine:
                raise DecisionError(f"{reviewer} has no decision in batch {batch.id} to undo")
            last = mine[-1]
            _refuse_if_taken(last, "undo")
            self._append([{"kind": "undo", "id": uuid.uuid4().hex, "undoes": last.id, "reviewer": reviewer, "at": _now()}])
        last.undone = True
        return last

    def claim(self, batch: Batch, reviewer: str) -> tuple[str, list[Decision]]:
        """Take every pending decision of ``batch`` for one enrolment: ``(claim id, decisions)``.
        Until :meth:`settle` they cannot be undone or replaced, and no other enrolment takes them."""
        reviewer = check_reviewer(reviewer)
        with self.locked():
            pending = [d for d in self.current(batch.id).values() if d.pending and d.claimed_by is None]
            claim = uuid.uuid4().hex
            if pending:
                self._append(
                    [
                        {
                            "kind": "claim",
                            "id": claim,
                            "batch": batch.id,
                            "decisions": [d.id for d in pending],
                            "reviewer": reviewer,
                            "pid": os.getpid(),
                            "host": socket.gethostname(),
                            "at": _now(),
                        }
                    ]
                )
        return claim, sorted(pending, key=lambda d: d.photo)

    def settle(self, claim: str, version: str | None, reviewer: str, error: str | None = None) -> None:
        """End a claim: its decisions joined gallery ``version``, or (``None``) they stay pending."""
        record: dict[str, Any] = {"kind": "enrolled" if version else "released", "claim": claim, "reviewer": reviewer, "at": _now()}
        if version:
            record["version"] = version
        if error:
            record["error"] = error
        with self.locked():
            self._append([record])

    # ------------------------------------------------------------------ reading out

    def export_csv(self, batch: str | None = None) -> str:
        """Every decision (of ``batch``) as CSV: who, when, what, on what evidence, its fate."""
        columns = [
            "batch", "photo", "image", "path", "action", "individual_id", "reviewer", "decided_at", "undone", "enrolled_in",
            "gallery_version", "machine_decision", "decision_score", "threshold", "chosen_rank", "chosen_score", "candidates",
        ]  # fmt: skip
        records = self.records()
        paths = {r["id"]: r.get("path", "") for r in records if r["kind"] == "decision"}
        out = io.StringIO()
        writer = csv.DictWriter(out, columns, lineterminator="\n")
        writer.writeheader()
        for d in self.decisions(batch, records):
            ev = d.evidence
            writer.writerow(
                {
                    "batch": d.batch,
                    "photo": d.photo,
                    "image": d.image,
                    "path": paths.get(d.id, ""),
                    "action": d.action,
                    "individual_id": d.individual_id,
                    "reviewer": d.reviewer,
                    "decided_at": d.at,
                    "undone": str(d.undone).lower(),
                    "enrolled_in": d.enrolled_in or "",
                    "gallery_version": ev.get("gallery_version", ""),
                    "machine_decision": ev.get("machine_decision", ""),
                    "decision_score": ev.get("decision_score", ""),
                    "threshold": ev.get("threshold", ""),
                    "chosen_rank": ev.get("chosen_rank", ""),
                    "chosen_score": ev.get("chosen_score", ""),
                    "candidates": " ".join(f"{c['individual_id']}:{c['similarity']}" for c in ev.get("candidates", [])),
                }
            )
        return out.getvalue()


def _refuse_if_taken(decision: Decision, verb: str) -> None:
    if decision.enrolled_in:
        raise DecisionError(
            f"{decision.image} is enrolled in gallery {decision.enrolled_in} as {decision.individual_id}: "
            f"it cannot be {'undone' if verb == 'undo' else 'decided again'} here"
        )
    if decision.claimed_by:
        raise DecisionError(f"{decision.image} is being enrolled right now: try again when the enrolment is done")


# ------------------------------------------------------------------ the queue

STATUS_ORDER = {"to review": 0, "skipped": 1, "pending": 2, "enrolled": 3, "error": 4}


def review_queue(batch: Batch, current: dict[int, Decision]) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """The batch's photos in the order they most need a human, and the counts per status.

    Undecided photos first, the most borderline first: the smallest distance between the
    decision score and its threshold (a photo far above it is a clear match, far below a
    clear new animal). Then skipped, then decided and waiting to be enrolled, then
    enrolled; photos that could not be identified last.
    """
    entries = []
    for number, row in enumerate(batch.photos):
        d = current.get(number)
        if row.get("status") != "ok":
            status = "error"
        elif d is None:
            status = "to review"
        elif d.action == "skip":
            status = "skipped"
        elif d.enrolled_in:
            status = "enrolled"
        else:
            status = "pending"
        margin = None
        if row.get("decision_score") is not None and row.get("threshold") is not None:
            margin = float(row["decision_score"]) - float(row["threshold"])
        entries.append({"photo": number, "image": row["image"], "status": status, "margin": margin, "decision": d, "row": row})
    entries.sort(key=lambda e: (STATUS_ORDER[e["status"]], abs(e["margin"]) if e["margin"] is not None else 0.0, e["photo"]))
    counts = {s: sum(e["status"] == s for e in entries) for s in STATUS_ORDER}
    counts["total"] = len(entries)
    return entries, counts


def evidence_of(batch: Batch, photo: int, action: str, individual_id: str) -> dict[str, Any]:
    """What the page showed for a photo when the decision was taken: the gallery version,
    the threshold and decision score, the machine's decision, every candidate's score, its
    parts and its best gallery photo, and the rank chosen."""
    row = batch.photo(photo)
    candidates = [
        {
            "rank": c["rank"],
            "individual_id": c["individual_id"],
            "similarity": c["similarity"],
            "score_parts": c.get("score_parts"),
            "inliers": c.get("inliers"),
            "gallery_image": c.get("gallery_image"),
        }
        for c in row.get("candidates", [])
    ]
    chosen = next((c for c in candidates if c["individual_id"] == individual_id), None) if action == "confirm" else None
    return {
        "gallery_version": batch.data.get("gallery", {}).get("version"),
        "threshold": row.get("threshold"),
        "decision_score": row.get("decision_score"),
        "machine_decision": row.get("decision"),
        "candidates": candidates,
        "chosen_rank": chosen["rank"] if chosen else None,
        "chosen_score": chosen["similarity"] if chosen else None,
    }


__all__ = ["ACTIONS", "Decision", "DecisionError", "DecisionLog", "check_new_id", "check_reviewer", "evidence_of", "propose_id", "review_queue"]
