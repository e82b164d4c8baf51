"""Tests of the Helm chart in charts/shoal.

The chart is rendered and linted by Helm itself: `helm-python-sdk` (PyPI) ships Helm v4's Go SDK
as a shared library (libhelm_c) inside its wheel and drives it through ctypes, so no helm binary
and no network are involved. Every rendered object is validated against the Kubernetes OpenAPI
schemas shipped in `kubernetes-validate` (strict: unknown fields fail), and every argument the
chart hands to shoal is parsed with shoal's own parser, so a flag the daemon does not have fails
here rather than in a crash-looping pod.

    .venv/bin/pytest tests/unit/chart
"""
