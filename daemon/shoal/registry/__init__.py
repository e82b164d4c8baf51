"""The OCI distribution pull API that containerd talks to."""
