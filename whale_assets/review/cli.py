"""``whale review``: serve the review page for the home (127.0.0.1 by default)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any

from whale_ml.home import HomeLayout
from whale_ml.review.batches import Batch

DEFAULT_PORT = 8765


def make_enrol(layout: HomeLayout, tracking_uri: str, device: str):  # type: ignore[no-untyped-def]
    """(batch, reviewer) -> enrol the batch's pending decisions as ``whale enroll`` does: the
    models the served gallery was built with, one writer at a time, and the new version
    reported to Dagster as a materialisation of the round's ``gallery``."""
    from whale_assets.identify_cli import report_gallery_version
    from whale_ml.gallery.models import gallery_models
    from whale_ml.review.enrol import enrol_decisions

    def enrol(batch: Batch, reviewer: str) -> tuple[dict[str, Any] | None, list[Any]]:
        summary, decisions = enrol_decisions(
            layout,
            batch,
            reviewer,
            lambda release, lineage: gallery_models(lineage, release.model_dir, tracking_uri, release.home / "model_cache"),
            device,
        )
        if summary is not None:
            report_gallery_version(layout, summary)
        return summary, decisions

    return enrol


def review_main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="whale review",
        description="Serve a web page to review the batches `whale identify` kept: confirm a candidate, mark a new individual, "
        "skip, undo, and enrol the decided photos as a new gallery version.",
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"port (default {DEFAULT_PORT})")
    parser.add_argument("--device", default="cpu", help="for enrolment: cpu (default), auto, cuda or cuda:N")
    args = parser.parse_args(argv)

    import uvicorn

    from whale_assets.identify_cli import _setup, _tracking_uri
    from whale_assets.review.app import create_app
    from whale_ml.training.trainer import resolve_device

    layout = _setup()
    app = create_app(layout, make_enrol(layout, _tracking_uri(), str(resolve_device(args.device))))
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"whale review: listening on {args.host}: anyone who reaches it can enrol into this catalogue", file=sys.stderr)
    print(f"whale review: http://{args.host}:{args.port}/ (home {layout.home}); Ctrl+C stops it", file=sys.stderr, flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return 0
