"""Training rounds: the fold models and everything after them, once per round.

A round is a value the asset factories take (``arcface_model_asset(rnd)``, ...). Round 1
trains on ``cv_folds``; its keys, groups and files are the plain ones (``gallery``, group
``retrieval``, ``$WHALE_HOME/gallery``). Round k > 1 is the same definitions under the
key prefix, group prefix and folder ``round<k>`` (``round2/gallery``, group
``round2_retrieval``, ``$WHALE_HOME/rounds/round2``), trained on
``round<k>/pseudo_labelled_folds``: ``cv_folds`` plus the test photos that round k-1's
fold models predicted confidently (``round<k>/pseudo_labels``). What comes before the
folds (metadata, crops, local features, the folds' validation side) the rounds share.

How many rounds the code location holds is decided when its definitions are built:
``$WHALE_ROUNDS`` (default :data:`whale_ml.environment.DEFAULT_ROUNDS`), or the count
a caller asks for with :func:`building_rounds` (``whale run`` with its recipe's
``rounds``, the tests). The last round makes the release: its assets alone carry the
rebuild condition and the freshness policies, its gallery records it as the home's newest
release, and its ``release`` asset logs it to MLflow and decides whether it becomes the
champion release (``whale_ml/gallery/release.py``, ``champion.py``), which ``whale
identify`` and ``whale enroll`` serve.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import TYPE_CHECKING

import dagster as dg

from whale_assets.freshness import RETRAIN_FRESHNESS
from whale_ml.environment import read_environment
from whale_ml.home import HomeLayout, fold_label, round_name

if TYPE_CHECKING:
    from whale_assets.resources import WhaleHome

# Dagster's eager condition on the release's stages after the folds: a parent was updated
# since the last run, no parent is missing, and none is still being materialised (so all
# folds finish first); and every blocking check of every parent passed (or runs in the same
# request), so a parent whose blocking check failed (folds that leak, unclean metadata, a
# malformed submission) is not rebuilt on. It acts only while the ``rebuild_after_folds``
# sensor is switched on.
REBUILD_AFTER_FOLDS = (dg.AutomationCondition.eager() & dg.AutomationCondition.all_deps_blocking_checks_passed()).with_label(
    "eager, after blocking checks"
)


@dataclass(frozen=True)
class Round:
    """Round ``number`` of a graph of ``count`` rounds (the last is the release)."""

    number: int
    count: int

    def __post_init__(self) -> None:
        if not 1 <= self.number <= self.count:
            raise ValueError(f"round {self.number} of {self.count}: rounds are numbered 1 to the count")

    @property
    def name(self) -> str | None:
        """None for the first round; ``round<k>``, the key prefix, group prefix and folder of a later one."""
        return round_name(self.number)

    @property
    def title(self) -> str:
        """``round<k>``, the first round included: the ``round`` tag of its MLflow runs, ``whale run``'s summary."""
        return f"round{self.number}"

    @property
    def is_release(self) -> bool:
        return self.number == self.count

    @property
    def release_number(self) -> int | None:
        """Its number when it is the release (what its gallery records as the home's release), else None."""
        return self.number if self.is_release else None

    @property
    def previous(self) -> Round | None:
        """The round whose outputs this one's pseudo-labels (and warm starts) come from; None for the first."""
        return Round(self.number - 1, self.count) if self.number > 1 else None

    @property
    def prefix(self) -> list[str] | None:
        return None if self.name is None else [self.name]

    @property
    def training_folds(self) -> dg.AssetKey:
        """The fold table its fold models train on: ``cv_folds``, or the round's pseudo-labelled folds."""
        return dg.AssetKey("cv_folds") if self.previous is None else self.key("pseudo_labelled_folds")

    @property
    def rebuild_condition(self) -> dg.AutomationCondition | None:
        """What its stages after the folds rebuild on: :data:`REBUILD_AFTER_FOLDS` for the
        release; nothing for an earlier round (rebuilt when a run asks, e.g. ``whale run``)."""
        return REBUILD_AFTER_FOLDS if self.is_release else None

    @property
    def freshness_policy(self) -> dg.FreshnessPolicy | None:
        """The retraining schedule's freshness policy (whale_assets/freshness.py), carried by
        the release's fold models and submission: the ones that answer."""
        return RETRAIN_FRESHNESS if self.is_release else None

    def key(self, asset: str) -> dg.AssetKey:
        """The round's key of one of its assets (``round2/gallery``)."""
        return dg.AssetKey([*(self.prefix or []), asset])

    def from_previous(self, asset: str) -> list[dg.AssetKey]:
        """The previous round's ``asset`` as a dependency (none for the first round)."""
        return [] if self.previous is None else [self.previous.key(asset)]

    def owns(self, key: dg.AssetKey) -> bool:
        """Whether ``key`` is this round's (for the first round: any key without a round prefix)."""
        return list(key.path[:-1]) == (self.prefix or [])

    def op(self, asset: str) -> str:
        """The op (run-config ``ops`` section) that computes the round's ``asset``: ``gallery``, ``round2__gallery``."""
        return self.key(asset).to_python_identifier()

    def group(self, group: str) -> str:
        """The round's group for a stage group (``training`` -> ``round2_training``)."""
        return group if self.name is None else f"{self.name}_{group}"

    def stage(self, stage: str) -> str:
        """The round's name for a stage and its job (``train_folds`` -> ``round2_train_folds``)."""
        return self.group(stage)

    def label(self, fold: str) -> str:
        """A fold's name in MLflow run names and registry aliases (``fold0``, ``round2_fold0``)."""
        return fold_label(self.name, fold)

    def layout(self, whale: WhaleHome) -> HomeLayout:
        """The home's paths, with this round's models, embeddings, galleries and submission."""
        return whale.layout.in_round(self.name)


_ASKED: ContextVar[int | None] = ContextVar("whale_rounds", default=None)


def round_count() -> int:
    """How many rounds the definitions built now hold: the count :func:`building_rounds`
    asks for, else ``$WHALE_ROUNDS`` (read now), else the project's default."""
    return _ASKED.get() or read_environment().rounds


@contextmanager
def building_rounds(count: int) -> Iterator[None]:
    """Definitions built in this block (``whale_assets.definitions.defs()``) hold ``count``
    rounds, whatever ``$WHALE_ROUNDS`` says: what ``whale run`` does with its recipe's count."""
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise ValueError(f"rounds: expected a whole number >= 1, not {count!r}")
    token = _ASKED.set(count)
    try:
        yield
    finally:
        _ASKED.reset(token)


def graph_rounds(count: int | None = None) -> tuple[Round, ...]:
    """The rounds of a graph of ``count`` rounds (default :func:`round_count`), in order; the last is the release."""
    count = round_count() if count is None else count
    return tuple(Round(k, count) for k in range(1, count + 1))
