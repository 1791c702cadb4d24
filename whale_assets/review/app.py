"""``whale review``: a local web page to review identified photos, decide, and enrol.

A FastAPI app with Jinja2 templates (autoescaped: every id and file name is shown as
text) and its own static script and style sheet: nothing is loaded from outside the
server, so it works offline. The work is in :mod:`whale_ml.review` (batches, decisions,
the queue) and :func:`whale_ml.review.enrol.enrol_decisions` (the path of ``whale enroll``);
this module turns requests into those calls and pages.

Routes:

* ``GET /``: the batches ``whale identify`` kept, newest first, with their counts;
* ``GET /batch/{id}?photo=N``: the queue and one photo with its candidates;
* ``POST /api/batch/{id}/decide`` ``{photo, action, individual_id?, reviewer}``,
  ``POST /api/batch/{id}/undo`` ``{reviewer}``, ``POST /api/batch/{id}/enrol`` ``{reviewer}``;
* ``GET /batch/{id}/decisions.csv``: every decision on the batch;
* ``GET /batch/{id}/photo/{n}/matches/{rank}.jpg``: the keypoint matches drawn;
* ``GET /file?path=...&batch=...``: an image, only from under the home or the batch's
  photo folders (anything else is refused with 403).
"""

from __future__ import annotations

import io
import threading
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jinja2
import pandas as pd
from fastapi import FastAPI, HTTPException, Query, Request
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates
from PIL import Image, ImageOps
from pydantic import BaseModel

from whale_ml.data.images import ImageReadError
from whale_ml.data.metadata import MetadataError
from whale_ml.gallery import LineageError
from whale_ml.gallery.ledger import read_ledger
from whale_ml.gallery.release import ReleasePointerError
from whale_ml.home import HomeLayout
from whale_ml.review.batches import Batch, BatchError, list_batches, load_batch
from whale_ml.review.decisions import (
    ACTIONS,
    DecisionError,
    DecisionLog,
    check_new_id,
    check_reviewer,
    evidence_of,
    propose_id,
    review_queue,
)
from whale_ml.stage_configs import LocalFeatureConfig

HERE = Path(__file__).resolve().parent
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp"}
MAX_SIDE = 1600  # the largest image the page is sent: photos at survey size are 1,500-4,000 px
BATCHES_KEPT = 8  # batches held in memory
QUEUE_SHOWN = 300  # queue entries listed beside a photo (the counts cover all)


class DecideBody(BaseModel):
    photo: int
    action: str
    individual_id: str = ""
    reviewer: str = ""


class ReviewerBody(BaseModel):
    reviewer: str = ""


Enrol = Callable[[Batch, str], tuple[dict[str, Any] | None, list[Any]]]


def create_app(layout: HomeLayout, enrol: Enrol) -> FastAPI:
    """The review app over ``layout``'s batches.

    Args:
        enrol: (batch, reviewer) -> enrol that batch's pending decisions
            (:func:`whale_ml.review.enrol.enrol_decisions` bound to the home's models).
    """
    app = FastAPI(title="whale review", docs_url=None, redoc_url=None, openapi_url=None)
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(HERE / "templates"), autoescape=True, undefined=jinja2.StrictUndefined)
    templates = Jinja2Templates(env=env)
    app.mount("/static", StaticFiles(directory=HERE / "static"), name="static")
    log = DecisionLog(layout)
    home = layout.home.resolve()
    sources = GallerySources(layout)

    loaded: dict[str, Batch] = {}  # batches never change once kept: read each once (28k photos: ~80 MB of JSON)

    def batch_or_404(batch_id: str) -> Batch:
        if batch_id not in loaded:
            try:
                batch = load_batch(layout, batch_id)
            except BatchError as exc:
                raise HTTPException(404, str(exc)) from exc
            if len(loaded) >= BATCHES_KEPT:
                loaded.pop(next(iter(loaded)))
            loaded[batch_id] = batch
        return loaded[batch_id]

    @app.exception_handler(DecisionError)
    @app.exception_handler(MetadataError)
    async def refused(_request: Request, exc: Exception) -> JSONResponse:
        return JSONResponse({"error": str(exc)}, status_code=400)

    @app.get("/health")
    def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/", response_class=HTMLResponse)
    def index(request: Request) -> Response:
        rows = []
        for batch in list_batches(layout):
            _, counts = review_queue(batch, log.current(batch.id))
            rows.append({"batch": batch, "counts": counts})
        return templates.TemplateResponse(request, "index.html", {"rows": rows, "home": str(home)})

    @app.get("/batch/{batch_id}", response_class=HTMLResponse)
    def batch_page(request: Request, batch_id: str, photo: int | None = None) -> Response:
        batch = batch_or_404(batch_id)
        current = log.current(batch.id)
        queue, counts = review_queue(batch, current)
        if photo is None:
            if not queue:
                return templates.TemplateResponse(request, "batch.html", _page(batch, queue, counts, None, current, home))
            return RedirectResponse(f"/batch/{batch.id}?photo={queue[0]['photo']}", status_code=303)
        try:
            batch.photo(photo)
        except BatchError as exc:
            raise HTTPException(404, str(exc)) from exc
        return templates.TemplateResponse(request, "batch.html", _page(batch, queue, counts, photo, current, home))

    @app.post("/api/batch/{batch_id}/decide")
    def decide(batch_id: str, body: DecideBody) -> dict[str, Any]:
        batch = batch_or_404(batch_id)
        row = _photo_or_400(batch, body.photo)
        individual = body.individual_id.strip()
        if body.action == "confirm":
            if individual not in {c["individual_id"] for c in row.get("candidates", [])}:
                raise DecisionError(f"{individual!r} is not a candidate of {row['image']}: confirm one of its five, or mark a new individual")
        elif body.action == "new":
            individual = check_new_id(individual, sources.known_ids(batch))
        elif body.action not in ACTIONS:
            raise DecisionError(f"unknown action {body.action!r}")
        d = log.decide(batch, body.photo, body.action, body.reviewer, individual, evidence_of(batch, body.photo, body.action, individual))
        return {"decision": _decision_json(d), "next": _next_photo(batch, log, body.photo)}

    @app.post("/api/batch/{batch_id}/undo")
    def undo(batch_id: str, body: ReviewerBody) -> dict[str, Any]:
        batch = batch_or_404(batch_id)
        d = log.undo(batch, body.reviewer)
        return {"undone": _decision_json(d), "next": d.photo}

    @app.post("/api/batch/{batch_id}/enrol")
    def enrol_route(batch_id: str, body: ReviewerBody) -> JSONResponse:
        batch = batch_or_404(batch_id)
        reviewer = check_reviewer(body.reviewer)
        try:
            summary, enrolled = enrol(batch, reviewer)
        except MetadataError as exc:
            return JSONResponse(
                {"error": f"enrolment refused, nothing changed: {exc}. Decide those photos again (undo, skip, or another id), then enrol."},
                status_code=400,
            )
        except (LineageError, ReleasePointerError) as exc:
            return JSONResponse({"error": f"enrolment failed, nothing changed: {exc}"}, status_code=409)
        except Exception as exc:  # a failed write, a lost MLflow server: said on the page, the trace in the server's log
            traceback.print_exc()
            return JSONResponse({"error": f"enrolment failed, nothing changed: {type(exc).__name__}: {exc}"}, status_code=500)
        if summary is None:
            return JSONResponse({"version": None, "enrolled": 0, "message": "nothing to enrol: no confirmed or new photo is waiting"})
        sources.forget()
        return JSONResponse(
            {
                "version": summary["version"],
                "enrolled": len(enrolled),
                "new_individuals": summary["new_individuals_now"],
                "message": f"gallery {summary['version']}: {len(enrolled)} photo(s) enrolled"
                + (f", new: {', '.join(summary['new_individuals_now'])}" if summary["new_individuals_now"] else ""),
            }
        )

    @app.get("/batch/{batch_id}/decisions.csv")
    def export(batch_id: str) -> Response:
        batch = batch_or_404(batch_id)
        return Response(
            log.export_csv(batch.id),
            media_type="text/csv; charset=utf-8",
            headers={"Content-Disposition": f'attachment; filename="decisions-{batch.id}.csv"'},
        )

    @app.get("/file")
    def file(path: str, batch: str | None = None, size: int = Query(MAX_SIDE, ge=16, le=MAX_SIDE)) -> Response:
        roots = [home]
        if batch is not None:
            roots += [p.resolve() for p in batch_or_404(batch).source_folders]
        target = _allowed(path, roots)
        return _jpeg(target, size)

    @app.get("/batch/{batch_id}/photo/{photo}/matches/{rank}.jpg")
    def matches(batch_id: str, photo: int, rank: int) -> Response:
        batch = batch_or_404(batch_id)
        row = _photo_or_400(batch, photo)
        cand = next((c for c in row.get("candidates", []) if c["rank"] == rank), None)
        if cand is None:
            raise HTTPException(404, f"{row['image']} has no candidate of rank {rank}")
        data = sources.drawing(batch, photo, rank)
        return Response(data, media_type="image/jpeg", headers={"Cache-Control": "max-age=3600"})

    return app


# ---------------------------------------------------------------- helpers


def _photo_or_400(batch: Batch, photo: int) -> dict[str, Any]:
    try:
        return batch.photo(photo)
    except BatchError as exc:
        raise DecisionError(str(exc)) from exc


def _decision_json(d: Any) -> dict[str, Any]:
    return {
        "id": d.id,
        "photo": d.photo,
        "image": d.image,
        "action": d.action,
        "individual_id": d.individual_id,
        "reviewer": d.reviewer,
        "at": d.at,
        "undone": d.undone,
        "enrolled_in": d.enrolled_in,
    }


def _next_photo(batch: Batch, log: DecisionLog, after: int) -> int | None:
    """The photo that most needs a human now (None when every photo is decided)."""
    queue, _ = review_queue(batch, log.current(batch.id))
    waiting = [e["photo"] for e in queue if e["status"] == "to review" and e["photo"] != after]
    return waiting[0] if waiting else None


def _allowed(path: str, roots: list[Path]) -> Path:
    """``path`` resolved (links followed) when it is an image file under one of ``roots``.

    Raises:
        HTTPException: 403 outside them or not an image, 404 when there is no such file.
    """
    try:
        target = Path(path).resolve(strict=False)
    except (OSError, RuntimeError, ValueError) as exc:
        raise HTTPException(403, "refused: not a path this page serves") from exc
    if not any(target.is_relative_to(r) for r in roots) or target.suffix.lower() not in IMAGE_SUFFIXES:
        raise HTTPException(403, "refused: the review page serves images from the home and the batch's photo folders only")
    if not target.is_file():
        raise HTTPException(404, "no such image")
    return target


def _jpeg(path: Path, side: int) -> Response:
    try:
        with Image.open(path) as im:
            im.draft("RGB", (side, side))  # JPEG: decode at a reduced size straight away
            im = ImageOps.exif_transpose(im).convert("RGB")
            im.thumbnail((side, side))
            buf = io.BytesIO()
            im.save(buf, format="JPEG", quality=88)
    except (OSError, ValueError) as exc:
        raise HTTPException(422, f"{path.name} cannot be read as an image") from exc
    return Response(buf.getvalue(), media_type="image/jpeg", headers={"Cache-Control": "max-age=3600"})


def _shown(queue: list[dict[str, Any]], position: int | None) -> list[dict[str, Any]]:
    """The first :data:`QUEUE_SHOWN` entries, and the current photo's if it lies beyond them."""
    shown = queue[:QUEUE_SHOWN]
    if position is not None and position >= QUEUE_SHOWN:
        shown.append(queue[position])
    return shown


def _page(
    batch: Batch, queue: list[dict[str, Any]], counts: dict[str, int], photo: int | None, current: dict[int, Any], home: Path
) -> dict[str, Any]:
    row = batch.photo(photo) if photo is not None else None
    position = next((i for i, e in enumerate(queue) if e["photo"] == photo), None)
    return {
        "batch": batch,
        "queue": _shown(queue, position),
        "queue_hidden": max(0, len(queue) - QUEUE_SHOWN),
        "counts": counts,
        "photo": photo,
        "row": row,
        "decision": current.get(photo) if photo is not None else None,
        "proposed_id": propose_id(batch, photo) if photo is not None else "",
        "prev_photo": queue[position - 1]["photo"] if position else None,
        "next_photo": queue[position + 1]["photo"] if position is not None and position + 1 < len(queue) else None,
        "pending": sum(1 for e in queue if e["status"] == "pending"),
        "home": str(home),
    }


class GallerySources:
    """Where each gallery photo came from (its file and detector box), for the keypoint
    drawings: the pipeline's ``photos`` and ``bboxes`` tables, and the enrollment ledger.
    Read once and again when the files change; drawings are kept in memory."""

    def __init__(self, layout: HomeLayout) -> None:
        self.layout = layout
        self._lock = threading.Lock()
        self._stamp: tuple[float, ...] | None = None
        self._where: dict[str, tuple[str, tuple[float, float, float, float] | None]] = {}
        self._drawings: dict[tuple[str, int, int], bytes] = {}

    def forget(self) -> None:
        with self._lock:
            self._stamp = None

    def _files(self) -> list[Path]:
        t = self.layout.tables
        return [t / "photos.parquet", t / "bboxes.parquet", self.layout.enrolled_dir / "enrolled.csv"]

    def where(self, image: str) -> tuple[str, tuple[float, float, float, float] | None] | None:
        with self._lock:
            stamp = tuple(p.stat().st_mtime if p.exists() else 0.0 for p in self._files())
            if stamp != self._stamp:
                self._where = self._read()
                self._stamp = stamp
            return self._where.get(image)

    def _read(self) -> dict[str, tuple[str, tuple[float, float, float, float] | None]]:
        photos_file, boxes_file, _ = self._files()
        where: dict[str, tuple[str, tuple[float, float, float, float] | None]] = {}
        if photos_file.exists():
            photos = pd.read_parquet(photos_file, columns=["image", "path"])
            boxes: dict[str, tuple[float, float, float, float]] = {}
            if boxes_file.exists():
                b = pd.read_parquet(boxes_file, columns=["image", "x_min", "y_min", "x_max", "y_max"])
                boxes = {r.image: (r.x_min, r.y_min, r.x_max, r.y_max) for r in b.itertuples()}
            where = {img: (path, boxes.get(img)) for img, path in zip(photos["image"], photos["path"], strict=True)}
        for img in read_ledger(self.layout)["image"]:
            # An enrolled photo's copy in the ledger; its box is found again from the whole photo.
            where[img] = (str(self.layout.enrolled_dir / "images" / img), None)
        return where

    def known_ids(self, batch: Batch) -> set[str]:
        """Individuals the catalogue knows: the training table's, every enrolled one and the
        batch's candidates (a new id must be none of them; the enrolment checks again against
        the very gallery it extends)."""
        known = {c["individual_id"] for row in batch.photos for c in row.get("candidates", [])}
        train = self.layout.tables / "train_metadata.parquet"
        if train.exists():
            known |= set(pd.read_parquet(train, columns=["individual_id"])["individual_id"])
        return known | set(read_ledger(self.layout)["individual_id"])

    def drawing(self, batch: Batch, photo: int, rank: int) -> bytes:
        key = (batch.id, photo, rank)
        with self._lock:
            if key in self._drawings:
                return self._drawings[key]
        row = batch.photo(photo)
        cand = next(c for c in row["candidates"] if c["rank"] == rank)
        # The photo that gave the ranking's inliers, so that the drawing shows what was counted.
        found = self.where(cand.get("inlier_image") or cand["gallery_image"])
        cfg = LocalFeatureConfig(**batch.data.get("local_features", {}))
        from whale_ml.retrieval.match_drawing import keypoint_matches

        if found is None:
            raise HTTPException(404, f"the gallery photo of {cand['individual_id']} is not in the home's tables")
        try:
            image, _inliers = keypoint_matches(row["path"], row.get("box"), found[0], found[1], cfg)
        except (ImageReadError, OSError) as exc:
            raise HTTPException(422, f"keypoints cannot be drawn: {exc}") from exc
        buf = io.BytesIO()
        image.convert("RGB").save(buf, format="JPEG", quality=90)
        with self._lock:
            if len(self._drawings) > 512:
                self._drawings.clear()
            self._drawings[key] = buf.getvalue()
        return buf.getvalue()

