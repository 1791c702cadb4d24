#!/usr/bin/env bash
# Start the Dagster UI (with its daemon) and the MLflow UI on 127.0.0.1; Ctrl-C stops both.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${BIN:-.venv/bin}
: "${WHALE_HOME:=$PWD/whale_home}"
: "${DAGSTER_HOME:=$WHALE_HOME/dagster_home}"
: "${DAGSTER_PORT:=3000}"
: "${MLFLOW_PORT:=5000}"
: "${WHALE_UI_HOST:=127.0.0.1}"
export WHALE_HOME DAGSTER_HOME WHALE_MLFLOW_UI="http://$WHALE_UI_HOST:$MLFLOW_PORT"
"$BIN/python" -c "from whale_assets.instance import prepare_dagster_home; prepare_dagster_home()"
mkdir -p "$WHALE_HOME/mlartifacts"

# Each server in its own process group, so that stopping it stops its workers too.
setsid "$BIN/mlflow" ui --backend-store-uri "${MLFLOW_TRACKING_URI:-sqlite:///$WHALE_HOME/mlflow.db}" \
  --artifacts-destination "$WHALE_HOME/mlartifacts" --host "$WHALE_UI_HOST" --port "$MLFLOW_PORT" --workers 1 &
mlflow_pid=$!
setsid "$BIN/dagster" dev -w workspace.yaml -h "$WHALE_UI_HOST" -p "$DAGSTER_PORT" &
dagster_pid=$!
stop() { kill -TERM -- "-$dagster_pid" "-$mlflow_pid" 2>/dev/null || true; sleep 3; kill -KILL -- "-$dagster_pid" "-$mlflow_pid" 2>/dev/null || true; }
trap stop EXIT INT TERM

cat <<MSG

  Dagster UI : http://$WHALE_UI_HOST:$DAGSTER_PORT   (assets, lineage, runs; DAGSTER_HOME=$DAGSTER_HOME)
  MLflow UI  : http://$WHALE_UI_HOST:$MLFLOW_PORT   (one run per fold model)
  Ctrl-C stops both.

MSG
wait -n "$dagster_pid" "$mlflow_pid"
