# syntax=docker/dockerfile:1
# shoal's container image: `docker build -t shoal .` from the repository root.
#
# The builder compiles the wheels (fastecdsa, a libp2p dependency, has no binary wheel and needs
# gcc + GMP); the runtime stage gets only the finished virtualenv.

ARG PYTHON_IMAGE=python:3.11-slim

FROM ${PYTHON_IMAGE} AS builder
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PYTHONDONTWRITEBYTECODE=1
RUN apt-get update \
 && apt-get install -y --no-install-recommends build-essential libgmp-dev \
 && rm -rf /var/lib/apt/lists/*
RUN python -m venv /opt/shoal
WORKDIR /src
COPY pyproject.toml ./
COPY daemon ./daemon
# Build shoal's wheel, then install it and its dependencies into the venv from wheels only.
RUN /opt/shoal/bin/pip wheel --wheel-dir /wheels . \
 && /opt/shoal/bin/pip install --no-index --find-links /wheels shoal \
 && /opt/shoal/bin/shoal --version

FROM ${PYTHON_IMAGE}
# libgmp10: runtime library of fastecdsa's extension modules.
RUN apt-get update \
 && apt-get install -y --no-install-recommends libgmp10 \
 && rm -rf /var/lib/apt/lists/*
COPY --from=builder /opt/shoal /opt/shoal
ENV PATH=/opt/shoal/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
# Non-root by default. On a node the Helm chart runs the containers as uid 0 with every
# capability dropped: containerd's socket (0660 root:root) and its hosts directory are
# root-owned, and /var/lib/shoal is a root-owned hostPath. `shoal run` against a socket and data
# directory it can reach needs no root at all (e.g. tests, a dev machine).
USER 65532:65532
EXPOSE 30020 30021 30022
ENTRYPOINT ["shoal"]
CMD ["run"]
