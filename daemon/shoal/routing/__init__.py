"""Finding which peers hold a key (a digest or a tag), behind one small asyncio interface.

Importing this package stays cheap: libp2p (~80 MB, ~0.6 s) is imported only when a
`Libp2pRouter` is made (`shoal.routing.libp2p`).
"""

from shoal.routing.base import NodeInfo, Peer, Router
from shoal.routing.factory import make_router
from shoal.routing.options import RoutingOptions

__all__ = ["NodeInfo", "Peer", "Router", "RoutingOptions", "make_router"]
