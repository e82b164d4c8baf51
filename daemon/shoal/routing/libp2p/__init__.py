"""The libp2p router: py-libp2p's host and Kademlia DHT in a trio thread (`router` is the asyncio
face), with shoal's bulk announce and fast lookup. Importing this package imports no libp2p."""
