"""How fresh the fold models and the submission should be: as fresh as the retraining
schedule makes them.

The schedule ``weekly_retrain`` (``defs/automation.py``) retrains every fold on
``$WHALE_RETRAIN_CRON`` and ``rebuild_after_folds`` rebuilds the submission after it.
``arcface_model`` and ``submission_csv`` carry a time-window freshness policy
(Dagster 1.13's ``FreshnessPolicy.time_window``, evaluated by the daemon's freshness
loop and shown on the asset in the UI) derived from that cron:

- ``period``: the longest gap between two ticks of the cron (a week for the default
  ``0 3 * * 0``), the longest a model may wait for its next retraining;
- ``grace = min(period, 1 day)``: the time a retraining and the rebuild after it may take;
- WARN once the newest materialisation is older than ``period + grace / 2``,
  FAIL once it is older than ``period + grace`` (8 days for the default cron).

Not ``FreshnessPolicy.cron``: its window ends at a cron tick, and the tick that should
bound the window is the retraining's tick plus the time it takes, which no cron string
derived from an arbitrary ``$WHALE_RETRAIN_CRON`` can say. docs/architecture.md.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

import dagster as dg
from dagster._utils.schedules import cron_string_iterator, is_valid_cron_string

from whale_ml.environment import read_environment

GRACE_CAP = dt.timedelta(days=1)
# Ticks sampled from a fixed start, so every load finds the same period: four years cover
# every month length, weekday and leap day; at most this many ticks (an hourly cron: 83 days).
_SAMPLE_START = dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc)
_SAMPLE_SPAN = dt.timedelta(days=4 * 366)
_SAMPLE_TICKS = 2000


@dataclass(frozen=True)
class RetrainWindow:
    """The freshness windows that follow from a retraining cron."""

    cron: str
    period: dt.timedelta
    grace: dt.timedelta

    @property
    def warn_after(self) -> dt.timedelta:
        return self.period + self.grace / 2

    @property
    def fail_after(self) -> dt.timedelta:
        return self.period + self.grace

    def policy(self) -> dg.FreshnessPolicy:
        return dg.FreshnessPolicy.time_window(fail_window=self.fail_after, warn_window=self.warn_after)


def longest_cron_gap(cron: str) -> dt.timedelta:
    """The longest time between two consecutive ticks of ``cron`` (UTC, the schedule's zone)."""
    if not is_valid_cron_string(cron):
        raise ValueError(f"$WHALE_RETRAIN_CRON: {cron!r} is not a valid cron string (e.g. '0 3 * * 0', Sundays at 03:00 UTC)")
    ticks = cron_string_iterator(_SAMPLE_START.timestamp(), cron, "UTC")
    longest, previous = dt.timedelta(0), next(ticks)
    for n, tick in enumerate(ticks, start=1):
        longest, previous = max(longest, tick - previous), tick
        if n >= _SAMPLE_TICKS or tick - _SAMPLE_START > _SAMPLE_SPAN:
            break
    return longest


def retrain_window(cron: str) -> RetrainWindow:
    """The windows for a retraining cron: its longest gap, and a grace of at most a day."""
    period = longest_cron_gap(cron)
    return RetrainWindow(cron, period, min(period, GRACE_CAP))


# What the fold models and the submission carry (read with the definitions, like the schedule's cron).
RETRAIN_WINDOW = retrain_window(read_environment().retrain_cron)
RETRAIN_FRESHNESS = RETRAIN_WINDOW.policy()
