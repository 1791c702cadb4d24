"""What a failure of MLflow means: the server or store is away or busy (worth trying again
later), what was asked for does not exist, or the server refused the request (credentials, a
URL that is not an MLflow server), which no retry can change.

Judged by exception type, HTTP status and MLflow's ``error_code``, never by message text:
MLflow's client words a 401 and a dead server alike ("API request to ... failed"). What
MLflow 3.17's client raises, found by experiment against a real ``mlflow server``, a SQLite
store and a plain HTTP server (tests/test_mlflow_errors.py, tests/test_registry.py):

- nothing listening, a timeout: ``MlflowException(INTERNAL_ERROR)`` raised while handling
  requests' ``ConnectionError``/``Timeout`` (in ``__context__``);
- 429 and 5xx: retried by MLflow's own HTTP client, then ``MlflowException(INTERNAL_ERROR)``
  raised while handling requests' ``RetryError``;
- any other status with a non-JSON body: ``MlflowException`` with the status's code (401
  ``UNAUTHENTICATED``, 403 ``PERMISSION_DENIED``, 404 ``ENDPOINT_NOT_FOUND``); with a JSON
  body: ``RestException`` (or a subclass) with the body's ``error_code``, which for a proxy's
  JSON says nothing (``INTERNAL_ERROR``);
- a SQLite store locked by another process: ``MlflowException(TEMPORARILY_UNAVAILABLE)`` from
  SQLAlchemy's ``OperationalError`` from sqlite3's (``SQLITE_BUSY``), after SQLite's 20 s wait;
- a registered model, version, run or artifact that does not exist:
  ``RESOURCE_DOES_NOT_EXIST``; an alias that does not exist: ``INVALID_PARAMETER_VALUE``.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from urllib.parse import urlparse

# MLflow error codes that say "not now": the server is overloaded, rate-limits, timed out,
# or its store is busy (the SQLite store's code for a locked database).
TRANSIENT_CODES = frozenset({"TEMPORARILY_UNAVAILABLE", "REQUEST_LIMIT_EXCEEDED", "RESOURCE_EXHAUSTED", "DEADLINE_EXCEEDED"})
# HTTP statuses that say the same (the ones MLflow's own client retries).
TRANSIENT_STATUSES = frozenset({408, 429, 500, 502, 503, 504})
MISSING_CODES = frozenset({"RESOURCE_DOES_NOT_EXIST"})
_UNAUTHENTICATED = frozenset({"UNAUTHENTICATED", "CUSTOMER_UNAUTHORIZED"})
_SQLITE_BUSY = frozenset({sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED})


class MlflowRefusedError(RuntimeError):
    """The tracking server answered and refused the request (credentials, permissions, a URL
    that is not an MLflow server): asking again gets the same answer, so it is never retried.

    Attributes:
        tracking_uri: the server that refused.
        status: the HTTP status it answered.
    """

    def __init__(self, message: str, tracking_uri: str, status: int) -> None:
        super().__init__(message)
        self.tracking_uri = tracking_uri
        self.status = status


def refusal_message(tracking_uri: str, status: int, detail: str) -> str | None:
    """What to tell the user when ``tracking_uri`` answered ``status``, or None when the status
    is not a refusal of the whole server (a missing model is MLflow's own message to give)."""
    if status == 401:
        return (
            f"MLflow at {tracking_uri} refused the credentials (401): set MLFLOW_TRACKING_USERNAME/MLFLOW_TRACKING_PASSWORD "
            f"or MLFLOW_TRACKING_TOKEN [{detail}]"
        )
    if status == 403:
        return (
            f"MLflow at {tracking_uri} denied access (403): the user in MLFLOW_TRACKING_USERNAME or MLFLOW_TRACKING_TOKEN "
            f"lacks the permission; ask the server's administrator [{detail}]"
        )
    if status == 404:
        return (
            f"{tracking_uri} is not an MLflow tracking server (404): check MLFLOW_TRACKING_URI (an MLflow server older "
            f"than this client answers 404 to the APIs it lacks too) [{detail}]"
        )
    return None


def refusal(exc: BaseException, tracking_uri: str) -> MlflowRefusedError | None:
    """``exc`` as a :class:`MlflowRefusedError` naming ``tracking_uri``, when MLflow's client
    raised it for a 401, 403 or for an API endpoint the server does not have (404); else None
    (always for a file or database store: only a server answers with a status)."""
    if urlparse(tracking_uri).scheme not in ("http", "https"):
        return None
    code = mlflow_error_code(exc)
    status = 401 if code in _UNAUTHENTICATED else 403 if code == "PERMISSION_DENIED" else 404 if code == "ENDPOINT_NOT_FOUND" else None
    if status is None:
        return None
    detail = str(getattr(exc, "message", exc)).split(". Response body")[0]  # the body is the proxy's HTML page
    message = refusal_message(tracking_uri, status, detail)
    return None if message is None else MlflowRefusedError(message, tracking_uri, status)


@contextmanager
def refusals_named(tracking_uri: str) -> Iterator[None]:
    """Re-raise a refusal of the tracking server (:func:`refusal`) as a
    :class:`MlflowRefusedError` that names ``tracking_uri`` and what to set: MLflow's own
    message names only the endpoint. Any other error passes unchanged."""
    try:
        yield
    except Exception as exc:
        refused = refusal(exc, tracking_uri)
        if refused is None:
            raise
        raise refused from exc


def mlflow_error_code(exc: BaseException) -> str | None:
    """MLflow's error code of ``exc`` (``RESOURCE_DOES_NOT_EXIST``, ...), None when it is not MLflow's."""
    code = getattr(exc, "error_code", None) if _is_mlflow_exception(exc) else None
    return code if isinstance(code, str) else None


def is_missing(exc: BaseException) -> bool:
    """True when MLflow says the thing asked for (model, version, run, artifact) does not exist."""
    return mlflow_error_code(exc) in MISSING_CODES


def is_transient(exc: BaseException) -> bool:
    """True when ``exc`` says the MLflow server or store is away or busy: worth retrying later,
    unlike a refusal, a bug or bad data.

    The cause chain (``__cause__``, else ``__context__``: MLflow's client raises its own
    error while handling requests') is judged from its innermost exception outwards, and the
    first that has a verdict decides: the innermost is the most specific (the sqlite3 error
    under SQLAlchemy's under MLflow's; the refused connection under requests' under MLflow's).
    """
    chain: list[BaseException] = []
    current: BaseException | None = exc
    while current is not None and all(current is not seen for seen in chain):
        chain.append(current)
        current = current.__cause__ or current.__context__
    for error in reversed(chain):
        verdict = _verdict(error)
        if verdict is not None:
            return verdict
    return False


def _verdict(exc: BaseException) -> bool | None:
    """Whether this one exception says transient (True) or final (False); None: it does not say."""
    import requests

    if isinstance(exc, MlflowRefusedError):
        return False
    if isinstance(exc, sqlite3.Error):
        # Busy or locked: another process holds the database. Other SQLite errors are left
        # to the store's error code that wraps them.
        return True if getattr(exc, "sqlite_errorcode", None) in _SQLITE_BUSY else None
    if isinstance(exc, requests.exceptions.SSLError):
        return False  # a certificate that does not verify will not verify next time either
    if isinstance(exc, (requests.ConnectionError, requests.Timeout, requests.exceptions.RetryError, ConnectionError, TimeoutError)):
        return True  # nothing listening, no answer in time, or only 429/5xx answers until the client gave up
    if isinstance(exc, requests.HTTPError) and exc.response is not None:
        return _status_verdict(exc.response.status_code)
    if _is_mlflow_exception(exc):
        code = mlflow_error_code(exc)
        if code in TRANSIENT_CODES:
            return True
        # The codes of a 4xx (and 501: not implemented) say the request itself is refused.
        # The 500 codes do not decide: INTERNAL_ERROR, MLflow's default, is also what its
        # client wraps a dead connection in, and what a proxy's JSON error body gets.
        status = exc.get_http_status_code()  # type: ignore[attr-defined]
        return False if 400 <= status < 500 or status == 501 else None
    return None


def _status_verdict(status: int) -> bool | None:
    if status in TRANSIENT_STATUSES:
        return True
    if 400 <= status < 600:
        return False  # the request itself is refused (4xx), or the server cannot do it at all (501, 505)
    return None


def _is_mlflow_exception(exc: BaseException) -> bool:
    """True for ``MlflowException`` and every subclass (``RestException`` and those of
    plugins), without importing MLflow for errors that cannot be MLflow's."""
    import sys

    module = sys.modules.get("mlflow.exceptions")
    return module is not None and isinstance(exc, module.MlflowException)
