# The pipeline and both UIs in one image. Build: docker build -t whale-photo-id .
# Run:  docker run -p 127.0.0.1:3000:3000 -p 127.0.0.1:5000:5000 -v $PWD/whale_home:/home/whale/whale_home whale-photo-id
# Inside the container the servers listen on 0.0.0.0 (the only way to publish a port);
# the -p 127.0.0.1:... mappings above keep them reachable from this machine only.
# Exact tag, with the Python requirements/constraints.txt was frozen with (3.11.7; tests/test_security.py
# checks both). A digest pin (python:3.11.7-slim-bookworm@sha256:...) would also fix the Debian layer;
# it could not be looked up offline here: add it with `docker buildx imagetools inspect <tag>`.
# Licences: this project's source is Apache-2.0, but the image also ships ultralytics
# (AGPL-3.0), so the image as a whole is conveyed under AGPL-3.0: whoever distributes it,
# or lets others use it over a network, takes on the AGPL's source obligations (or needs
# an Ultralytics Enterprise licence). README.md, "Licence", says what that means.
FROM python:3.11.7-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 \
    WHALE_HOME=/home/whale/whale_home \
    WHALE_UI_HOST=0.0.0.0 BIN=/usr/local/bin \
    MLFLOW_DISABLE_TELEMETRY=true DAGSTER_DISABLE_TELEMETRY=1 YOLO_OFFLINE=1 YOLO_AUTOINSTALL=0

# OpenCV (pulled in by ultralytics) needs these shared libraries; curl is the health check's.
# Debian versions are not pinned: the archive drops old ones, so pins would break the build.
RUN apt-get update && apt-get install -y --no-install-recommends libgl1 libglib2.0-0 curl \
    && rm -rf /var/lib/apt/lists/*

RUN useradd --create-home --uid 1000 whale
WORKDIR /app

# Dependencies first (exact pins), so code changes do not reinstall them.
COPY pyproject.toml README.md LICENSE ./
COPY requirements/constraints.txt requirements/constraints.txt
COPY whale_ml whale_ml
COPY whale_assets whale_assets
# With the k8s extra: the same image serves Dagster's user-code deployment and step pods on Kubernetes.
RUN pip install -c requirements/constraints.txt torch==2.14.1 torchvision==0.29.1 -e ".[k8s]"

COPY configs configs
COPY scripts scripts
COPY workspace.yaml Makefile ./
RUN chown -R whale:whale /app
USER whale

# 3000: the Dagster UI, 5000: MLflow, 8765: `whale review --host 0.0.0.0` (the review page)
EXPOSE 3000 5000 8765
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
    CMD curl -fsS http://127.0.0.1:3000/server_info || exit 1
CMD ["scripts/ui.sh"]
