"""``whale identify`` and ``whale enroll``: the researcher's daily loop on the command line.

Thin: the work is in :mod:`whale_ml.identify`, on the gallery versions of
:mod:`whale_ml.gallery` and the models of :mod:`whale_ml.registry`. This layer finds
the home, the MLflow store and the Dagster instance, and reports each enrollment to
Dagster as a materialisation of the release round's ``gallery`` asset, so the UI shows
every gallery version. All three commands serve the home's champion release (its round, its
models and the newest gallery version built with them), or, before any champion decision,
the last training round that built a gallery (:mod:`whale_ml.gallery.release`).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from whale_ml.environment import default_home
from whale_ml.home import HomeLayout

_NO_PROGRESS = "draw no progress bars (they are drawn on stderr only when it is a terminal)"


def _alias_template(alias: str) -> str:
    """``champion`` -> ``champion_{fold}``; ``latest`` -> ``{fold}`` (the newest); a template is kept."""
    if alias == "latest":
        return "{fold}"
    return alias if "{fold}" in alias else f"{alias}_{{fold}}"


def _setup() -> HomeLayout:
    """The home's layout (its release is resolved where it is used)."""
    from whale_ml.offline import configure_environment

    layout = HomeLayout(default_home())
    configure_environment(layout.home)
    return layout


def _tracking_uri() -> str:
    from whale_assets.resources import MlflowTracking

    return MlflowTracking().uri


def identify_main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="whale identify",
        description="Identify photos against the champion release's gallery: the five most similar individuals and the new_individual "
        "decision.",
    )
    parser.add_argument("photos", nargs="+", metavar="PHOTO_OR_DIR", help="photo files, or folders of photos")
    parser.add_argument("--json", action="store_true", help="print the result as JSON (schema: docs/identify.md)")
    parser.add_argument("--report", metavar="OUT.html", help="write a self-contained HTML page to check the matches by eye")
    parser.add_argument(
        "--alias",
        default="champion",
        help="registry alias of the fold models: champion (default), challenger, latest, or a template like 'my_{fold}'",
    )
    parser.add_argument("--model-version", nargs="+", metavar="V", help="registry versions instead, one per fold in fold order")
    parser.add_argument("--gallery-version", metavar="vNNNN", help="search this version of the release's gallery (default: the champion release's newest)")
    parser.add_argument("--device", default="cpu", help="cpu (default), auto, cuda or cuda:N")
    parser.add_argument("--no-progress", action="store_true", help=_NO_PROGRESS)
    args = parser.parse_args(argv)

    from whale_ml.gallery import LineageError, load_version
    from whale_ml.gallery.matchers import load_matcher
    from whale_ml.gallery.models import resolve_models
    from whale_ml.gallery.release import ReleasePointerError, read_release
    from whale_ml.identify import expand_inputs, format_text, identify_photos, write_report
    from whale_ml.progress import terminal_progress
    from whale_ml.registry import DEFAULT_ALIAS
    from whale_ml.review.batches import CROPS, batch_workspace, feature_settings, save_batch
    from whale_ml.training.trainer import resolve_device

    device = str(resolve_device(args.device))
    # The champion release serves unless other models or another version are asked for: then
    # the newest version (or the one named), as a home without a champion decision serves.
    champion_served = args.gallery_version is None and args.model_version is None and _alias_template(args.alias) == DEFAULT_ALIAS
    try:
        release = read_release(_setup())
        layout = release.layout
        served = release.champion if champion_served else None
        gallery = load_version(layout, args.gallery_version, models_key=served.models_key if served else None)
        models = resolve_models(
            gallery.lineage,
            _tracking_uri(),
            layout.home / "model_cache",
            gallery.name,
            alias=_alias_template(args.alias),
            versions=args.model_version,
            round=layout.round,
        )
        # The champion's own matcher, as its release scored it; else the one tuned for this version's models.
        matcher = load_matcher(layout, gallery.lineage, gallery.name, stored=served.matcher if served else None)
        paths = expand_inputs(args.photos)
        if not paths:
            print("whale identify: no photos found in " + ", ".join(args.photos), file=sys.stderr)
            return 2
        # The batch is kept for `whale review`: its crops are written straight into its folder.
        workspace = batch_workspace(layout)
        try:
            with terminal_progress(enabled=not args.no_progress) as progress:
                result = identify_photos(paths, layout, gallery, models, matcher, workspace / CROPS, device, progress)
            result["round"] = release.number
            result["release_run"] = served.run_id if served else None
            batch = save_batch(layout, workspace, result, local_features=feature_settings(layout, matcher.matcher).model_dump())
        finally:
            shutil.rmtree(workspace, ignore_errors=True)  # gone once renamed; what a failure left
        if args.report:
            write_report(batch.data, args.report)
    except (LineageError, ReleasePointerError) as exc:
        print(f"whale identify: {exc}", file=sys.stderr)
        return 2
    if gallery.fallback_from:
        print(f"whale identify: gallery {gallery.fallback_from} could not be read; answered with {gallery.name}, the newest whole version", file=sys.stderr)
    result["batch"] = batch.id
    for row in result["photos"]:  # the crops are the batch's; the report holds them inline
        row.pop("crop_path", None)
    # The batch's name is in the JSON; the text ends with it (stderr stays for errors and bars).
    print(json.dumps(result, indent=2) if args.json else format_text(result) + f"\n\nbatch {batch.id} kept for review: whale review")
    if args.report:
        print(f"report: {Path(args.report).resolve()}", file=sys.stderr)
    return 0


def report_gallery_version(layout: HomeLayout, summary: dict[str, Any]) -> None:
    """A runless materialisation of the enrolled round's ``gallery`` (``round2/gallery``...)
    in the Dagster instance: the UI's gallery asset then shows the enrolled version, its
    counts and the list of versions."""
    import dagster as dg

    from whale_assets.instance import prepare_dagster_home
    from whale_assets.metadata import table_meta
    from whale_assets.rounds import Round
    from whale_ml.gallery import list_versions
    from whale_ml.gallery.catalogue import catalogue_lock
    from whale_ml.home import round_name

    number = summary["round"]
    layout = layout.in_round(round_name(number))

    prepare_dagster_home(layout.home)
    # Two first enrolments of a fresh home would both create the instance's SQLite tables
    # ("table alembic_version already exists"): they take turns here too.
    with catalogue_lock(layout, "whale enroll (Dagster event)"):
        instance = dg.DagsterInstance.get()
    instance.report_runless_asset_event(
        dg.AssetMaterialization(
            asset_key=Round(number, number).key("gallery"),
            description=f"whale enroll: {summary['enrolled_photos_now']} photo(s) added as gallery {summary['version']}",
            metadata={
                "version": summary["version"],
                "made_by": "whale enroll",
                "version_photos": summary["gallery_photos"],
                "version_individuals": summary["gallery_individuals"],
                "enrolled_photos": summary["enrolled_photos"],
                "enrolled_individuals": summary["enrolled_individuals"],
                "enrolled_now": summary["enrolled_photos_now"],
                "new_individuals_now": len(summary["new_individuals_now"]),
                "versions": table_meta(list_versions(layout)),
                "folder": dg.MetadataValue.path(str(layout.gallery_versions_dir / summary["version"])),
            },
        )
    )


def enroll_main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="whale enroll",
        description="Add confirmed photos (CSV image,individual_id[,species]; new ids allowed) to the gallery as a new version.",
    )
    parser.add_argument("confirmed", metavar="CONFIRMED.csv", help="image,individual_id rows (species optional)")
    parser.add_argument("--images", required=True, metavar="DIR", help="folder holding the listed photos")
    parser.add_argument("--device", default="cpu", help="cpu (default), auto, cuda or cuda:N")
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")
    parser.add_argument("--no-progress", action="store_true", help=_NO_PROGRESS)
    args = parser.parse_args(argv)

    from whale_ml.data.metadata import MetadataError
    from whale_ml.gallery import LineageError
    from whale_ml.gallery.models import gallery_models
    from whale_ml.gallery.release import ReleasePointerError
    from whale_ml.identify import enroll
    from whale_ml.progress import terminal_progress
    from whale_ml.training.trainer import resolve_device

    layout = _setup()
    uri = _tracking_uri()
    try:
        with terminal_progress(enabled=not args.no_progress) as progress:
            summary = enroll(
                args.confirmed,
                args.images,
                layout,
                lambda release, lineage: gallery_models(lineage, release.model_dir, uri, release.home / "model_cache"),
                str(resolve_device(args.device)),
                progress=progress,
            )
    except (LineageError, MetadataError, ReleasePointerError) as exc:
        print(f"whale enroll: {exc}", file=sys.stderr)
        return 2
    report_gallery_version(layout, summary)
    if summary["parent_unreadable"]:
        print(f"whale enroll: gallery {summary['parent_unreadable']} could not be read; extended {summary['parent']}, the newest whole version", file=sys.stderr)
    if summary["carried_enrolled"]:
        print(f"whale enroll: also added {summary['carried_enrolled']} photo(s) of the ledger that no gallery version held yet", file=sys.stderr)
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        new = summary["new_individuals_now"]
        print(
            f"gallery {summary['version']} (from {summary['parent']}): {summary['enrolled_photos_now']} photo(s) of "
            f"{summary['enrolled_individuals_now']} individual(s) enrolled"
            + (f", new: {', '.join(new)}" if new else "")
            + f"; now {summary['gallery_photos']} photos of {summary['gallery_individuals']} individuals "
            f"({summary['enrolled_photos']} enrolled). The next `whale run` trains on them too."
        )
    return 0


def prune_main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="whale prune-gallery",
        description="Delete old versions of the served release's gallery (gallery/versions/vNNNN), keeping the newest N, always "
        "the current one and the newest built with the champion release's models.",
    )
    parser.add_argument("--keep", type=int, required=True, metavar="N", help="how many of the newest versions to keep (at least 1)")
    parser.add_argument("--dry-run", action="store_true", help="only list what would be deleted")
    args = parser.parse_args(argv)
    if args.keep < 1:
        parser.error(f"--keep must be at least 1, not {args.keep}")

    from whale_ml.gallery import list_versions, prune_versions
    from whale_ml.gallery.release import ReleasePointerError, read_release

    try:
        release = read_release(_setup())
    except ReleasePointerError as exc:
        print(f"whale prune-gallery: {exc}", file=sys.stderr)
        return 2
    layout = release.layout
    before = list_versions(layout)
    doomed = prune_versions(layout, args.keep, dry_run=args.dry_run, keep_line=release.models_key)
    verb = "would delete" if args.dry_run else "deleted"
    kept = [n for n in before["version"] if n not in doomed]
    print(f"{verb} {len(doomed)} gallery version(s){': ' + ', '.join(doomed) if doomed else ''}; kept {', '.join(kept) or 'none'}")
    return 0
