"""Finding which peers hold a key (a digest or a tag), behind one small asyncio interface."""

from shoal.routing.base import Peer, Router
from shoal.routing.memory import MemoryNetwork, MemoryRouter

__all__ = ["MemoryNetwork", "MemoryRouter", "Peer", "Router"]
