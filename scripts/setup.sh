#!/usr/bin/env bash
# Installs everything shoal's demo and tests need on a fresh Debian 12 machine (run as root):
# the real components (containerd 1.6, distribution's docker-registry, skopeo, iproute2), the
# other containerd versions the tests run on (scripts/containerd-versions.sh: unpacked or built
# into /var/cache/shoal-dev, nothing installed system-wide) and a virtualenv at .venv with shoal
# and its development tools. Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."
need=()
for bin in containerd ctr docker-registry skopeo ip tc gcc curl flock; do
  command -v "$bin" >/dev/null 2>&1 || need+=("$bin")
done
# libp2p's fastecdsa is built from source: it needs GMP's headers.
dpkg -s libgmp-dev >/dev/null 2>&1 || need+=(libgmp-dev)
if [ ${#need[@]} -gt 0 ]; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq containerd docker-registry skopeo iproute2 gcc curl util-linux \
    libgmp-dev >/dev/null
fi
# The status page's browser test: Debian's chromium and its driver (no browser is downloaded).
if ! command -v chromium >/dev/null 2>&1 || ! command -v chromedriver >/dev/null 2>&1; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends chromium chromium-driver fonts-dejavu-core \
    >/dev/null
fi
# containerd 2.3 is built from its Go module with the machine's Go (Debian 12's is too old).
./scripts/containerd-versions.sh >/dev/null
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
.venv/bin/pip install -q --disable-pip-version-check -e '.[dev]'

# Go programs tests build from their Go modules (tests/harness/gotools.py holds the versions):
# the OCI conformance suite. Without Go, tests/e2e/test_conformance.py skips and says so.
if command -v go >/dev/null 2>&1 || [ -x /usr/local/go/bin/go ]; then
  .venv/bin/python -m tests.harness.gotools conformance >/dev/null
fi
