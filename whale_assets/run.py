"""Materialise the whole graph from the command line (what ``make demo`` runs).

Runs go through the Dagster instance in ``$DAGSTER_HOME`` (default
``$WHALE_HOME/dagster_home``), so the UI shows them afterwards with their
materialisations, checks and logs. The stages of ``whale_assets/stages.py``, in
order and in-process: ``prepare_data`` (everything up to the folds), ``train_folds``
once per fold partition, then ``ensemble_and_submit`` (gallery, threshold,
submission and score); then, when the recipe enables it (``pseudo_labels: {config:
{enabled: true}}``), the pseudo-label round's three stages, whose ``round2__<op>`` ops
take the recipe's ``<op>`` settings unless the recipe gives them their own.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from whale_assets.instance import prepare_dagster_home
from whale_ml.environment import default_data_dir, default_home

DEFAULT_RECIPE = Path(__file__).resolve().parent.parent / "configs" / "demo.yaml"


# Recipes written before boxes and crops became one pass name them as two ops.
LEGACY_OPS = {"bboxes": "boxes", "crops": "crops"}
PHOTO_PASS_OP = "boxes_and_crops"


def load_recipe(path: str | Path | None) -> dict[str, Any]:
    """A run-config recipe (``ops: {op: {config: ...}}``); empty when no file is given.

    The ``bboxes`` and ``crops`` sections of older recipes become the ``boxes`` and
    ``crops`` parts of ``boxes_and_crops``.
    """
    if path is None:
        return {}
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"recipe {path} not found")
    recipe = yaml.safe_load(path.read_text()) or {}
    ops = recipe.get("ops", {})
    for old, part in LEGACY_OPS.items():
        if old in ops:
            merged = ops.setdefault(PHOTO_PASS_OP, {}).setdefault("config", {})
            merged.setdefault(part, (ops.pop(old) or {}).get("config", {}))
    from whale_assets.stages import op_assets

    unknown = set(ops) - set(op_assets())
    if unknown:
        raise ValueError(f"{path}: unknown op(s) in ops: {', '.join(sorted(unknown))} (known: {', '.join(sorted(op_assets()))})")
    return recipe


def pseudo_label_round_enabled(recipe: dict[str, Any]) -> bool:
    """Whether the recipe asks ``whale run`` for the pseudo-label round."""
    return bool((((recipe.get("ops") or {}).get("pseudo_labels") or {}).get("config") or {}).get("enabled", False))


def with_round_ops(ops: dict[str, Any], op_names: Sequence[str]) -> dict[str, Any]:
    """``ops`` plus, for each later round's op (``round2__arcface_model``) the recipe does not
    configure, the first round's settings (``arcface_model``): a round trains as the first did."""
    inherited = {name: ops[name.split("__", 1)[1]] for name in op_names if "__" in name and name not in ops and name.split("__", 1)[1] in ops}
    return {**ops, **inherited}


def stage_run_config(recipe: dict[str, Any], keys: Sequence[str], log_level: str = "INFO") -> dict[str, Any]:
    """The recipe's config for the ops that compute the selected assets, with the console log at ``log_level``."""
    from whale_assets.stages import op_assets

    computes = op_assets()
    ops = {k: v for k, v in with_round_ops(recipe.get("ops", {}), list(computes)).items() if set(computes.get(k, [k])) & set(keys)}
    config: dict[str, Any] = {"loggers": {"console": {"config": {"log_level": log_level}}}}
    if ops:
        config["ops"] = ops
    return config


def run_pipeline(
    recipe: dict[str, Any], folds: Sequence[str] | None = None, log: Any = print, stages: Sequence[str] | None = None
) -> dict[str, Any]:
    """Materialise every asset (all fold partitions) and return the headline numbers.

    ``stages``: only these stages, by name (``whale_assets.stages.STAGES``), in the pipeline's
    order; e.g. the pseudo-label round's on a home whose first round is materialised.
    """
    import dagster as dg

    from whale_assets.definitions import defs as load_defs
    from whale_assets.instance import cli_run_tags

    defs = load_defs()
    job = defs.resolve_implicit_global_asset_job_def()
    instance = dg.DagsterInstance.get()
    with cli_run_tags(instance) as tags:  # held until the last stage ends: this process's runs are alive until then
        return _run_stages(recipe, folds, log, stages, job, instance, tags)


def _run_stages(
    recipe: dict[str, Any],
    folds: Sequence[str] | None,
    log: Any,
    stages: Sequence[str] | None,
    job: Any,
    instance: Any,
    tags: dict[str, str],
) -> dict[str, Any]:
    """:func:`run_pipeline`'s work, its runs tagged with ``tags``."""
    import dagster as dg

    from whale_assets.instance import release_dead_cli_runs
    from whale_assets.partitions import fold_partitions
    from whale_assets.stages import STAGES, asset_names

    for run_id in release_dead_cli_runs(instance):
        log(f"run {run_id} of a killed `whale run` marked failed; its gpu pool slot is free again")
    all_folds = fold_partitions.get_partition_keys()
    folds = list(folds or all_folds)
    unknown = set(folds) - set(all_folds)
    if unknown:
        raise ValueError(f"unknown fold(s) {sorted(unknown)}; this configuration has {all_folds}")
    unknown = set(stages or ()) - {s.name for s in STAGES}
    if unknown:
        raise ValueError(f"unknown stage(s) {sorted(unknown)}; the stages are {[s.name for s in STAGES]}")

    def stage(keys: list[str], partition: str | None = None) -> dg.ExecuteInProcessResult:
        label = ", ".join(keys) + (f" [{partition}]" if partition else "")
        log(f"==> materialising {label}")
        t0 = time.perf_counter()
        result = job.execute_in_process(
            run_config=stage_run_config(recipe, keys),
            instance=instance,
            partition_key=partition,
            asset_selection=[dg.AssetKey.from_user_string(k) for k in keys],
            tags=tags,
        )
        log(f"    done in {time.perf_counter() - t0:.0f} s (run {result.run_id})")
        return result

    timings: dict[str, float] = {}
    finals = []
    t0 = time.perf_counter()
    for each in STAGES:
        if (each.pseudo_label_round and not pseudo_label_round_enabled(recipe)) or (stages is not None and each.name not in stages):
            continue
        keys = asset_names(each.selection)
        for partition in folds if each.per_fold else [None]:
            t1 = time.perf_counter()
            final = stage(keys, partition)
            timings[f"{each.name}[{partition}]_s" if partition else f"{each.name}_s"] = time.perf_counter() - t1
        if not each.per_fold:
            finals.append(final)
    timings["total_s"] = time.perf_counter() - t0
    return _summary(timings, finals)


def _summary(timings: dict[str, float], finals: list[Any]) -> dict[str, Any]:
    """The headline numbers of the unpartitioned stages' materialisations; the pseudo-label
    round's under ``round2`` (its keys are ``round2/...``)."""
    summary: dict[str, Any] = {"timings": timings}
    for event in (e for final in finals for e in final.get_asset_materialization_events()):
        mat = event.step_materialization_data.materialization
        meta = {k: v.value for k, v in mat.metadata.items()}
        key = mat.asset_key.to_user_string()
        if key.startswith("round2/"):
            _headline(summary.setdefault("round2", {}), key.removeprefix("round2/"), meta)
        elif key == "pseudo_labels":
            summary["pseudo_labels"] = {"photos": meta.get("dagster/row_count"), "confidence": meta.get("confidence")}
        else:
            _headline(summary, key, meta)
    return summary


def _headline(summary: dict[str, Any], key: str, meta: dict[str, Any]) -> None:
    if key == "submission_score":
        summary["map5"] = meta.get("map5")
        summary["baseline_all_new_map5"] = meta.get("baseline_all_new_map5")
    elif key == "match_threshold":
        summary["oof_map5"] = meta.get("oof_map5")
        summary["threshold"] = meta.get("threshold")
    elif key == "submission_csv":
        summary["submission"] = meta.get("path")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="whale run", description="Materialise the whole pipeline (all folds) on $WHALE_DATA_DIR.")
    parser.add_argument("--recipe", default=str(DEFAULT_RECIPE), help="run-config recipe YAML (default: configs/demo.yaml)")
    parser.add_argument("--fold", action="append", dest="folds", help="train only these fold partitions (repeatable)")
    args = parser.parse_args(argv)

    home = default_home()
    prepare_dagster_home(home)
    print(f"data set : {default_data_dir()}\nhome     : {home}\nrecipe   : {args.recipe}")
    summary = run_pipeline(load_recipe(args.recipe), args.folds)

    print("\n==> done in {:.0f} s".format(summary["timings"]["total_s"]))
    print(f"submission        : {summary.get('submission')}")
    if summary.get("oof_map5") is not None:
        print(f"validation MAP@5  : {summary['oof_map5']:.4f} (out-of-fold, threshold {summary['threshold']:.4f})")
    if summary.get("map5") is not None:
        print(
            f"test MAP@5        : {summary['map5']:.4f} (answering new_individual everywhere scores {summary['baseline_all_new_map5']:.4f})"
        )
    else:
        print("test MAP@5        : no test_truth.csv in the data set")
    if "round2" in summary:
        r2, pseudo = summary["round2"], summary.get("pseudo_labels", {})
        print(f"pseudo-label round: {pseudo.get('photos')} pseudo-labels over the folds (confidence {pseudo.get('confidence')})")
        print(f"  submission      : {r2.get('submission')}")
        print(f"  validation MAP@5: {r2.get('oof_map5')}  test MAP@5: {r2.get('map5')}")
    print("open the UIs      : make ui   (Dagster http://127.0.0.1:3000, MLflow http://127.0.0.1:5000)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
