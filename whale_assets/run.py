"""Materialise the whole graph from the command line (what ``make demo`` runs).

Runs go through the Dagster instance in ``$DAGSTER_HOME`` (default
``$WHALE_HOME/dagster_home``), so the UI shows them afterwards with their
materialisations, checks and logs. The stages of ``whale_assets/stages.py``, in
order and in-process: ``prepare_data`` (everything up to the folds), then for each
training round the recipe asks for (top-level ``rounds``, default ``$WHALE_ROUNDS`` or
the default): its pseudo-labels (after the first round), its fold models once per fold
partition, and its ensemble stage (gallery, threshold, submission, score, release). The
last round makes the release, which ``whale identify`` and ``whale enroll`` serve when it
is the champion release (docs/training.md, "Releases in MLflow"). Each stage
materialises only what is due (:mod:`whale_assets.due`), everything with ``--force``. A later round's
op takes the settings of the round before it (``round2__arcface_model`` those of
``arcface_model``) unless the recipe gives it its own.
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
from whale_ml.environment import default_data_dir, default_home, read_environment

DEFAULT_RECIPE = Path(__file__).resolve().parent.parent / "configs" / "demo.yaml"


# Recipes written before boxes and crops became one pass name them as two ops.
LEGACY_OPS = {"bboxes": "boxes", "crops": "crops"}
PHOTO_PASS_OP = "boxes_and_crops"


def load_recipe(path: str | Path | None) -> dict[str, Any]:
    """A run-config recipe (``rounds: N``, ``ops: {op: {config: ...}}``); empty when no file is given.

    The ``bboxes`` and ``crops`` sections of older recipes become the ``boxes`` and
    ``crops`` parts of ``boxes_and_crops``. An op may be named by its asset's plain name
    when only later rounds have it (``pseudo_labels``: every round's pseudo-labels).

    Raises:
        ValueError: a bad ``rounds`` (:func:`recipe_rounds`), an unknown op, or the
            ``pseudo_labels`` section's ``enabled``, which ``rounds`` replaces.
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
    if "enabled" in (((ops.get("pseudo_labels") or {}).get("config")) or {}):
        raise ValueError(
            f"{path}: ops.pseudo_labels.config.enabled is not a setting: how many training rounds run is the recipe's top-level "
            "`rounds` (`rounds: 2`: the first round, then one round with its pseudo-labels; `rounds: 1`: the first alone)"
        )
    try:
        count = recipe_rounds(recipe)
    except ValueError as exc:
        raise ValueError(f"{path}: {exc}") from None
    known = recipe_op_names(count)
    unknown = set(ops) - known
    if unknown:
        raise ValueError(f"{path}: unknown op(s) in ops: {', '.join(sorted(unknown))} (known: {', '.join(sorted(known))})")
    return recipe


def _score(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def recipe_rounds(recipe: dict[str, Any]) -> int:
    """How many training rounds a run of ``recipe`` makes: its top-level ``rounds``, else
    ``$WHALE_ROUNDS``, else the project's default (whale_ml/environment.py).

    Raises:
        ValueError: ``rounds`` is not a whole number >= 1, or ``$WHALE_ROUNDS`` is set to
            another count: the code location the UI loads (with ``$WHALE_ROUNDS``) would
            then hold other rounds, and another release, than the run makes.
    """
    env = read_environment()
    asked = recipe.get("rounds")
    if asked is None:
        return env.rounds
    if isinstance(asked, bool) or not isinstance(asked, int) or asked < 1:
        raise ValueError(f"rounds: expected a whole number >= 1 (1: the first round alone; 2: then a pseudo-label round), not {asked!r}")
    if env.rounds_set and env.rounds != asked:
        raise ValueError(
            f"the recipe asks for rounds: {asked} but WHALE_ROUNDS={env.rounds}: the code location would hold another graph than "
            "this run makes. Make them agree, or unset WHALE_ROUNDS (the recipe then decides)"
        )
    return asked


def recipe_op_names(count: int) -> set[str]:
    """The op names a recipe of ``count`` rounds may configure: the graph's ops, and the plain
    names of the ops only later rounds have (``pseudo_labels``), which those rounds inherit."""
    from whale_assets.rounds import Round
    from whale_assets.stages import all_asset_names, op_assets

    second = Round(2, 2)
    later = {key.path[-1] for key in map(_key, all_asset_names(2)) if second.owns(key)}
    return set(op_assets(count)) | later


def round_ops(ops: dict[str, Any], count: int) -> dict[str, Any]:
    """``ops`` for a graph of ``count`` rounds, with each later round's op the recipe does not
    configure given the settings of the same op one round before (``round2__arcface_model``
    those of ``arcface_model``, ``round3__arcface_model`` those of ``round2__arcface_model``;
    ``round2__pseudo_labels`` those of the plain ``pseudo_labels``): a round trains as the
    one before it did."""
    from whale_assets.rounds import graph_rounds
    from whale_assets.stages import all_asset_names

    merged = dict(ops)
    keys = [_key(name) for name in all_asset_names(count)]
    rounds = graph_rounds(count)
    for previous, rnd in zip(rounds, rounds[1:]):  # in order: round 3 inherits what round 2 inherited
        for asset in (key.path[-1] for key in keys if rnd.owns(key)):
            own, before = rnd.op(asset), previous.op(asset)
            if own not in merged and before in merged:
                merged[own] = merged[before]
    return merged


def _key(name: str) -> Any:
    import dagster as dg

    return dg.AssetKey.from_user_string(name)


def stage_run_config(recipe: dict[str, Any], keys: Sequence[str], log_level: str = "INFO") -> dict[str, Any]:
    """The recipe's config for the ops that compute the selected assets (in the graph of the
    recipe's rounds), with the console log at ``log_level``."""
    from whale_assets.stages import op_assets

    count = recipe_rounds(recipe)
    computes = op_assets(count)
    ops = {k: v for k, v in round_ops(recipe.get("ops", {}), count).items() if k in computes and set(computes[k]) & set(keys)}
    config: dict[str, Any] = {"loggers": {"console": {"config": {"log_level": log_level}}}}
    if ops:
        config["ops"] = ops
    return config


def run_pipeline(
    recipe: dict[str, Any],
    folds: Sequence[str] | None = None,
    log: Any = print,
    stages: Sequence[str] | None = None,
    force: bool = False,
) -> dict[str, Any]:
    """Materialise what is due of the recipe's rounds (all fold partitions) and return the headline numbers.

    Each stage materialises only its assets that are missing, stale or set otherwise than
    their last materialisation (:mod:`whale_assets.due`), and its root assets, which read
    the data set; ``force`` materialises every asset of the stages.

    The definitions are built with the recipe's rounds (:func:`recipe_rounds`), whatever
    count this process built them with before. ``stages``: only these stages, by name
    (``whale_assets.stages.stages``), in the pipeline's order; e.g. a later round's on a
    home whose earlier rounds are materialised.
    """
    import dagster as dg

    from whale_assets.definitions import defs as load_defs
    from whale_assets.instance import cli_run_tags
    from whale_assets.rounds import building_rounds

    count = recipe_rounds(recipe)
    with building_rounds(count):
        defs = load_defs()
    job = defs.resolve_implicit_global_asset_job_def()
    instance = dg.DagsterInstance.get()
    with cli_run_tags(instance) as tags:  # held until the last stage ends: this process's runs are alive until then
        return _run_stages(recipe, count, folds, log, stages, job, instance, tags, force)


def _run_stages(
    recipe: dict[str, Any],
    count: int,
    folds: Sequence[str] | None,
    log: Any,
    stages: Sequence[str] | None,
    job: Any,
    instance: Any,
    tags: dict[str, str],
    force: bool = False,
) -> dict[str, Any]:
    """:func:`run_pipeline`'s work on a graph of ``count`` rounds, its runs tagged with ``tags``."""
    import dagster as dg

    from whale_assets.due import describe, due_now
    from whale_assets.instance import release_dead_cli_runs
    from whale_assets.partitions import fold_partitions
    from whale_assets.rounds import graph_rounds
    from whale_assets.stages import asset_names, stages as graph_stages

    rounds = graph_rounds(count)
    every = graph_stages(rounds)
    for run_id in release_dead_cli_runs(instance):
        log(f"run {run_id} of a killed `whale run` marked failed; its gpu pool slot is free again")
    all_folds = fold_partitions.get_partition_keys()
    folds = list(folds or all_folds)
    unknown = set(folds) - set(all_folds)
    if unknown:
        raise ValueError(f"unknown fold(s) {sorted(unknown)}; this configuration has {all_folds}")
    unknown = set(stages or ()) - {s.name for s in every}
    if unknown:
        raise ValueError(f"unknown stage(s) {sorted(unknown)}; the stages of {count} round(s) are {[s.name for s in every]}")

    graph = job.asset_layer.asset_graph  # the whole code location's: staleness looks upstream of the stage too

    def execute(keys: list[str], partition: str | None, why: str) -> None:
        label = ", ".join(keys) + (f" [{partition}]" if partition else "")
        log(f"==> materialising {label}" + (f"\n    due: {why}" if why else ""))
        t0 = time.perf_counter()
        result = job.execute_in_process(
            run_config=stage_run_config(recipe, keys),
            instance=instance,
            partition_key=partition,
            asset_selection=[dg.AssetKey.from_user_string(k) for k in keys],
            tags=tags,
        )
        log(f"    done in {time.perf_counter() - t0:.0f} s (run {result.run_id})")

    def stage(name: str, keys: list[str], partition: str | None) -> None:
        """Materialise what is due of the stage (everything with ``force``), wave by wave."""
        if force:
            execute(keys, partition, "")
            return
        asset_keys = [dg.AssetKey.from_user_string(k) for k in keys]
        config = stage_run_config(recipe, keys)
        done: set[dg.AssetKey] = set()
        while True:
            wave = due_now(instance, graph, asset_keys, partition, config, done)
            if not wave.run:
                break
            execute([k.to_user_string() for k in wave.run], partition, describe(wave))
            done |= set(wave.run)
        where = f"{name}" + (f" [{partition}]" if partition else "")
        if not done:
            log(f"==> {where}: up to date ({len(keys)} asset(s))")
        elif len(done) < len(keys):
            log(f"    {where}: {len(keys) - len(done)} asset(s) up to date")

    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    for each in every:
        if stages is not None and each.name not in stages:
            continue
        keys = asset_names(each.selection, count)
        for partition in folds if each.per_fold else [None]:
            t1 = time.perf_counter()
            stage(each.name, keys, partition)
            timings[f"{each.name}[{partition}]_s" if partition else f"{each.name}_s"] = time.perf_counter() - t1
    timings["total_s"] = time.perf_counter() - t0
    return _summary(timings, instance, rounds)


def _summary(timings: dict[str, float], instance: Any, rounds: Sequence[Any]) -> dict[str, Any]:
    """The headline numbers of the rounds' latest materialisations (made now or, when they were
    up to date, by an earlier run): per round under ``rounds`` (``round1``, ``round2``...),
    and the release's at the top level."""

    def found(key: Any) -> dict[str, Any] | None:
        event = instance.get_latest_materialization_event(key)
        if event is None or event.asset_materialization is None:
            return None
        return {k: v.value for k, v in event.asset_materialization.metadata.items()}

    per_round = {rnd.title: _headline(rnd, found) for rnd in rounds}
    release = rounds[-1].title
    decided = found(rounds[-1].key("release")) or {}
    champion = {"champion": decided.get("champion"), "decision": decided.get("decision"), "champion_round": decided.get("champion_round")}
    return {"timings": timings, **per_round[release], "release": release, **champion, "rounds": {k: v for k, v in per_round.items() if v}}


def _headline(rnd: Any, found: Any) -> dict[str, Any]:
    """One round's numbers, from the metadata of its assets' latest materialisations (``found(key)``)."""
    out: dict[str, Any] = {}
    if (meta := found(rnd.key("pseudo_labels"))) is not None:
        out["pseudo_labels"] = {"photos": meta.get("dagster/row_count"), "confidence": meta.get("confidence")}
    if (meta := found(rnd.key("match_threshold"))) is not None:
        out.update(oof_map5=meta.get("oof_map5"), threshold=meta.get("threshold"))
    if (meta := found(rnd.key("submission_csv"))) is not None:
        out["submission"] = meta.get("path")
    if (meta := found(rnd.key("submission_score"))) is not None:
        out.update(map5=meta.get("map5"), baseline_all_new_map5=meta.get("baseline_all_new_map5"))
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="whale run", description="Materialise the whole pipeline (all folds) on $WHALE_DATA_DIR.")
    parser.add_argument("--recipe", default=str(DEFAULT_RECIPE), help="run-config recipe YAML (default: configs/demo.yaml)")
    parser.add_argument("--fold", action="append", dest="folds", help="train only these fold partitions (repeatable)")
    parser.add_argument(
        "--force", action="store_true", help="materialise every asset, not only those missing, stale or set otherwise since their last run"
    )
    args = parser.parse_args(argv)

    home = default_home()
    prepare_dagster_home(home)
    recipe = load_recipe(args.recipe)
    print(f"data set : {default_data_dir()}\nhome     : {home}\nrecipe   : {args.recipe}\nrounds   : {recipe_rounds(recipe)}")
    summary = run_pipeline(recipe, args.folds, force=args.force)

    print("\n==> done in {:.0f} s".format(summary["timings"]["total_s"]))
    if len(summary["rounds"]) > 1:
        for title, numbers in summary["rounds"].items():
            pseudo = numbers.get("pseudo_labels")
            print(
                f"{title:<18}: validation MAP@5 {_score(numbers.get('oof_map5'))}, test MAP@5 {_score(numbers.get('map5'))}"
                + (f", trained with {pseudo['photos']} pseudo-labels (confidence {_score(pseudo['confidence'])})" if pseudo else "")
            )
    if summary.get("champion") is False:
        print(
            f"release           : {summary['release']}, not the champion ({summary['decision']}); whale identify and whale enroll "
            f"serve the champion release (round {summary['champion_round']})"
        )
    else:
        print(f"release           : {summary['release']}, the champion release (what whale identify and whale enroll serve)")
    print(f"submission        : {summary.get('submission')}")
    if summary.get("oof_map5") is not None:
        print(f"validation MAP@5  : {summary['oof_map5']:.4f} (out-of-fold, threshold {summary['threshold']:.4f})")
    if summary.get("map5") is not None:
        print(
            f"test MAP@5        : {summary['map5']:.4f} (answering new_individual everywhere scores {summary['baseline_all_new_map5']:.4f})"
        )
    else:
        print("test MAP@5        : no test_truth.csv in the data set")
    print("open the UIs      : make ui   (Dagster http://127.0.0.1:3000, MLflow http://127.0.0.1:5000)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
