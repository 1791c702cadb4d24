"""Which failures a step retries: only an MLflow server or store that is down or busy.

Dagster's retry policy retries any error raised while a step loads its inputs, runs its
body or stores its outputs. Most errors are final at the first attempt (a bug, bad data,
an input nobody has materialised), and retrying them only delays the message by minutes
of back-off. So the policy is paired with :func:`retry_only_if_transient` on the asset
bodies, and the IO manager raises a no-retry ``dg.Failure`` for a missing input
(docs/reliability.md, "Retry policy").
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import dagster as dg

from whale_ml import mlflow_errors
from whale_ml.environment import read_environment


def mlflow_retry_policy() -> dg.RetryPolicy:
    """The retry policy of the assets that talk to MLflow: ``$WHALE_MLFLOW_RETRIES``
    retries (default 3), the first after ``$WHALE_MLFLOW_RETRY_DELAY_S`` seconds
    (default 30), doubling each time, with jitter. Read when the definitions load.

    Dagster's policy would retry any failure of these steps (loading inputs, the body,
    storing outputs); the assets wrap their bodies in :func:`retry_only_if_transient`
    and the IO manager fails a missing input with a no-retry ``dg.Failure``, so that
    only a tracking server or store that is down or busy is retried, and anything else
    fails at once. (A resource that fails to initialise is never retried: Dagster
    raises that outside the policy.) ``WHALE_MLFLOW_RETRIES=0`` turns retries off.
    """
    env = read_environment()
    retries, delay = env.mlflow_retries, env.mlflow_retry_delay_s
    return dg.RetryPolicy(max_retries=retries, delay=delay, backoff=dg.Backoff.EXPONENTIAL, jitter=dg.Jitter.PLUS_MINUS)


def is_transient(exc: BaseException) -> bool:
    """True when ``exc`` (or an exception in its cause chain) says the MLflow server or
    store is away or busy: worth retrying later, unlike a refusal (401, 403, a URL that is
    not MLflow), a bug or bad data. Judged by exception type, HTTP status and MLflow's
    error code (:func:`whale_ml.mlflow_errors.is_transient`), never by message text:
    MLflow's client words a 401 like a dead server."""
    return mlflow_errors.is_transient(exc)


def retry_only_if_transient(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Let the asset's retry policy see only transient MLflow failures: any other error
    becomes a ``dg.Failure`` that disallows retries (its cause keeps the original
    traceback), so a bug or bad input fails in seconds, not after minutes of backoff."""

    @contextmanager
    def only_transient_retried() -> Iterator[None]:
        try:
            yield
        except (dg.Failure, dg.RetryRequested):
            raise
        except Exception as exc:
            if is_transient(exc):
                raise
            raise dg.Failure(description=f"{type(exc).__name__}: {exc}", allow_retries=False) from exc

    if inspect.isgeneratorfunction(fn):

        @functools.wraps(fn)
        def gen_wrapper(*args: Any, **kwargs: Any) -> Any:
            with only_transient_retried():
                yield from fn(*args, **kwargs)

        return gen_wrapper

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with only_transient_retried():
            return fn(*args, **kwargs)

    return wrapper
