"""Fetching for the cluster: one upstream download per blob (README, "Upstream, once per
cluster"): the spool, sharing what arrives, which node fetches, and whole images in order."""
