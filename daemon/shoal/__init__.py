"""shoal: a node-local, peer-to-peer container image mirror."""

__version__ = "0.1.0"
