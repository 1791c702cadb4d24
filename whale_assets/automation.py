"""Declarative automation shared by the asset definitions.

The stages after the fold models (champion/challenger, gallery, threshold,
submission, score) rebuild by themselves once their inputs are newer and nothing
upstream is still running -- after a scheduled retrain, or a single fold rerun
from the UI -- but only while the ``rebuild_after_folds`` sensor is switched on.
"""

import dagster as dg

# Dagster's eager condition: a parent was updated since the last run, no parent is
# missing, and none is still being materialised (so all folds finish first).
AFTER_FOLDS = dg.AutomationCondition.eager()
