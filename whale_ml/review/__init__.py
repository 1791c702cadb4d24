"""The review of identified photos: the batches ``whale identify`` answered, kept in the
home, and the reviewers' decisions on them (confirm a candidate, a new individual, skip),
enrolled through the same path as ``whale enroll``.

    from whale_ml.review import save_batch, load_batch, list_batches
    from whale_ml.review import DecisionLog, review_queue

The web page over them is ``whale review`` (:mod:`whale_assets.review`); docs/review.md.
"""

from whale_ml.review.batches import Batch, BatchError, list_batches, load_batch, save_batch
from whale_ml.review.decisions import Decision, DecisionError, DecisionLog, review_queue

__all__ = ["Batch", "BatchError", "Decision", "DecisionError", "DecisionLog", "list_batches", "load_batch", "review_queue", "save_batch"]
