"""What a failure of MLflow means, judged from real failures: a real HTTP server on 127.0.0.1
(python's http.server, in its own process) that answers every request with one status, as a
proxy that wants credentials (401), a server that is not MLflow (404) or one that is down
for maintenance (503) does; a port where nothing listens. A refusal fails at once, naming the
tracking URI; a server that is down or busy is retried; a missing checkpoint says to retrain."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import dagster as dg
import mlflow
import pandas as pd
import pytest
from mlflow.exceptions import MlflowException, RestException

from whale_assets.resources import MlflowTracking
from whale_assets.retries import is_transient
from whale_ml.registry import CheckpointFetchError, fetch_checkpoint

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="process groups")

# Answers every request, whatever its method and path, with argv[2] and a small HTML page
# (not JSON: what a proxy or a web server that is not MLflow sends).
_SERVER = """
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
status, body = int(sys.argv[2]), b"<html><body>not here</body></html>"
class Handler(BaseHTTPRequestHandler):
    def answer(self):
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        self.send_response(status)
        self.send_header("Content-Type", "text/html")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    do_GET = do_POST = do_PATCH = do_PUT = do_DELETE = answer
    def log_message(self, *args):
        pass
ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), Handler).serve_forever()
"""


@pytest.fixture
def http_server(free_port: Callable[[], int]) -> Iterator[Callable[[int], str]]:
    """Start a server answering every request with a given status; its URI. Stopped (its
    process group) when the test ends."""
    procs: list[subprocess.Popen] = []

    def start(status: int) -> str:
        port = free_port()
        procs.append(subprocess.Popen([sys.executable, "-c", _SERVER, str(port), str(status)], start_new_session=True))
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                return f"http://127.0.0.1:{port}"
            except OSError:
                assert procs[-1].poll() is None, f"the {status} server exited ({procs[-1].returncode})"
                assert time.monotonic() < deadline, "the test server did not listen in 30 s"
                time.sleep(0.05)

    yield start
    for proc in procs:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)


def _client_error(uri: str) -> MlflowException:
    """What MLflow's own client raises when it asks ``uri`` for a registry alias."""
    with pytest.raises(MlflowException) as raised:
        mlflow.MlflowClient(tracking_uri=uri).get_model_version_by_alias("whale-arcface", "champion_fold0")
    return raised.value


@pytest.mark.server
def test_a_server_that_refuses_or_is_not_mlflow_is_final(http_server: Callable[[int], str]) -> None:
    """401 (credentials) and 404 (not an MLflow server): no retry can change the answer."""
    for status in (401, 404):
        error = _client_error(http_server(status))
        assert not is_transient(error), (status, error)
        try:
            raise RuntimeError("logging failed") from error
        except RuntimeError as wrapped:  # judged through the cause chain
            assert not is_transient(wrapped)


@pytest.mark.server
def test_a_server_that_is_down_or_busy_is_transient(
    http_server: Callable[[int], str], free_port: Callable[[], int], monkeypatch: pytest.MonkeyPatch
) -> None:
    """503 and a port where nothing listens, as MLflow's client reports them once its own
    retries give up (none here: they would only add seconds of backoff before the same error)."""
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    assert is_transient(_client_error(http_server(503)))
    assert is_transient(_client_error(f"http://127.0.0.1:{free_port()}"))


class ProxyRestException(RestException):
    """A subclass of MLflow's REST error, as a plugin or a newer MLflow may raise."""


@pytest.mark.parametrize(
    ("error_code", "transient"),
    [
        ("TEMPORARILY_UNAVAILABLE", True),
        ("REQUEST_LIMIT_EXCEEDED", True),
        ("RESOURCE_EXHAUSTED", True),
        ("DEADLINE_EXCEEDED", True),
        ("UNAUTHENTICATED", False),
        ("PERMISSION_DENIED", False),
        ("ENDPOINT_NOT_FOUND", False),
        ("RESOURCE_DOES_NOT_EXIST", False),
        ("INVALID_PARAMETER_VALUE", False),
    ],
)
def test_rest_errors_and_their_subclasses_are_judged_by_error_code(error_code: str, transient: bool) -> None:
    for cls in (RestException, ProxyRestException):
        error = cls({"error_code": error_code, "message": "from the server"})
        assert is_transient(error) is transient, (cls.__name__, error_code)


@pytest.mark.server
def test_a_401_fails_the_reachability_probe_at_once_naming_the_uri(http_server: Callable[[int], str]) -> None:
    uri = http_server(401)
    started = time.monotonic()
    with pytest.raises(Exception) as raised:
        MlflowTracking(tracking_uri=uri).check_reachable()
    assert time.monotonic() - started < 5
    message = str(raised.value)
    assert uri in message and "401" in message and "MLFLOW_TRACKING_TOKEN" in message, message
    assert not is_transient(raised.value)


@pytest.mark.parametrize(
    ("status", "says"),
    [(401, "refused the credentials (401)"), (404, "is not an MLflow tracking server (404): check MLFLOW_TRACKING_URI")],
)
@pytest.mark.server
def test_an_mlflow_step_fails_at_the_first_attempt_when_the_server_refuses(
    http_server: Callable[[int], str], status: int, says: str
) -> None:
    """The real ``release`` asset, under its own MLflow retry policy (retries on, 30 s apart by
    default), pointed at a server that refuses it: one attempt, a failure naming the URI and
    what to check, in seconds. (MLflow's client does not retry a 4xx itself.) Its inputs are
    given by assets of the same keys: it asks MLflow before it reads them."""
    from whale_assets.defs.release import release_asset
    from whale_assets.resources import WhaleHome
    from whale_assets.rounds import Round

    release = release_asset(Round(1, 1))

    def given(key: str, value: object) -> dg.AssetsDefinition:
        @dg.asset(key=key)
        def upstream() -> object:
            return value

        return upstream

    values = {"gallery": {"version": "v0001"}, "match_threshold": {}, "submission_score": {}, "cv_folds": pd.DataFrame()}
    inputs = [given(key, value) for key, value in values.items()]
    uri = http_server(status)
    policy = release.op.retry_policy
    assert policy is not None and policy.max_retries >= 1  # the test means something only with retries on
    started = time.monotonic()
    resources = {"mlflow": MlflowTracking(tracking_uri=uri), "whale": WhaleHome()}
    result = dg.materialize([release, *inputs], resources=resources, raise_on_error=False)
    seconds = time.monotonic() - started
    events = result.events_for_node("release")
    retries = sum(e.event_type == dg.DagsterEventType.STEP_UP_FOR_RETRY for e in events)
    failures = [e.step_failure_data.error.message for e in events if e.event_type == dg.DagsterEventType.STEP_FAILURE]
    assert not result.success and retries == 0 and len(failures) == 1, (result.success, retries, failures)
    assert uri in failures[0] and says in failures[0], failures[0]
    assert seconds < 30, seconds


@pytest.mark.server
def test_fetch_checkpoint_says_retrain_only_when_the_checkpoint_is_missing(
    http_server: Callable[[int], str], free_port: Callable[[], int], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A run without the checkpoint artifact (a real SQLite store): retrain the fold. A server
    that refuses the credentials: say so, naming the URI, final. A server that is down: stay
    transient, so that the step is retried."""
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # see test_a_server_that_is_down_or_busy_is_transient
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = mlflow.MlflowClient(tracking_uri=uri)
    run = client.create_run(client.create_experiment("no-checkpoint", artifact_location=(tmp_path / "artifacts").as_uri()))
    with pytest.raises(CheckpointFetchError, match="retrain the fold"):
        fetch_checkpoint(uri, run.info.run_id, "0" * 64, tmp_path / "cache", "fold0 v1")

    refusing = http_server(401)
    with pytest.raises(Exception) as refused:
        fetch_checkpoint(refusing, run.info.run_id, "0" * 64, tmp_path / "cache", "fold0 v1")
    assert not isinstance(refused.value, CheckpointFetchError) and not is_transient(refused.value)
    assert refusing in str(refused.value) and "refused the credentials (401)" in str(refused.value), refused.value

    for down in (http_server(503), f"http://127.0.0.1:{free_port()}"):
        with pytest.raises(Exception) as unavailable:
            fetch_checkpoint(down, run.info.run_id, "0" * 64, tmp_path / "cache", "fold0 v1")
        assert not isinstance(unavailable.value, CheckpointFetchError) and is_transient(unavailable.value), (down, unavailable.value)
