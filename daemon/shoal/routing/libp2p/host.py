"""This node's libp2p host and DHT: identity, the address it announces, and making both."""

from __future__ import annotations

from typing import Any

from libp2p import new_host
from libp2p.crypto.keys import KeyPair
from libp2p.crypto.x25519 import create_new_key_pair as create_x25519_key_pair
from libp2p.custom_types import TProtocol
from libp2p.kad_dht.kad_dht import DHTMode, KadDHT
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import PeerInfo
from libp2p.security.noise.transport import PROTOCOL_ID as NOISE_PROTOCOL_ID
from libp2p.security.noise.transport import Transport as NoiseTransport
from libp2p.stream_muxer.yamux.yamux import PROTOCOL_ID as YAMUX_PROTOCOL_ID
from libp2p.stream_muxer.yamux.yamux import Yamux
from multiaddr import Multiaddr

from shoal.routing.libp2p import internals
from shoal.routing.options import RoutingOptions, ip_multiaddr, is_unspecified


def ip_of(addr: Multiaddr) -> str | None:
    for proto in ("ip4", "ip6"):
        try:
            value = addr.value_for_protocol(proto)
        except Exception:
            value = None
        if value:
            return str(value)
    return None


def provider_ip(info: PeerInfo) -> str | None:
    """The first concrete IP among a provider's addresses (never 0.0.0.0 / ::)."""
    for addr in info.addrs:
        ip = ip_of(addr)
        if ip and not is_unspecified(ip):
            return ip
    return None


class Host:
    """The libp2p host and its DHT once `make()` ran (in trio); None before."""

    def __init__(
        self,
        key_pair: KeyPair,
        listen_host: str,
        listen_port: int,
        announce_host: str,
        announce_port: int,
        options: RoutingOptions,
        psk: str | None = None,
    ) -> None:
        self.options = options
        self._key_pair = key_pair
        self.listen = Multiaddr(ip_multiaddr(listen_host, listen_port))
        self._announce_host = announce_host
        self._announce_port = announce_port
        self._psk = psk
        self.host: Any = None
        self.dht: KadDHT | None = None
        self.peer_id: ID | None = None

    def make(self) -> None:
        opts = self.options
        internals.apply_process_patches(
            opts.protocol_id, opts.record_ttl, opts.inbound_read_timeout
        )
        noise = NoiseTransport(self._key_pair, noise_privkey=create_x25519_key_pair().private_key)
        self.host = new_host(
            key_pair=self._key_pair,
            # Noise only: the default also offers TLS, secio and plaintext.
            sec_opt={NOISE_PROTOCOL_ID: noise},
            muxer_opt={TProtocol(YAMUX_PROTOCOL_ID): Yamux},
            listen_addrs=[self.listen],
            addrs_factory=self._announce_addrs,
            psk=self._psk,
            enable_mDNS=False,
        )
        self.peer_id = self.host.get_id()
        self.dht = KadDHT(self.host, DHTMode.SERVER)
        internals.tune_dht(
            self.dht,
            inbound_streams=opts.inbound_streams,
            add_provider_per_10s=opts.add_provider_per_10s,
        )

    def _announce_addrs(self, candidates: list[Multiaddr]) -> list[Multiaddr]:
        """addrs_factory: only the configured address, never the 0.0.0.0 we listen on.

        With an announce port of 0 (tests listen on port 0) the port actually bound is used.
        """
        port = self._announce_port
        if port == 0:
            for addr in candidates:
                try:
                    port = int(addr.value_for_protocol("tcp"))
                    break
                except Exception:
                    continue
        return [Multiaddr(ip_multiaddr(self._announce_host, port))]

    @property
    def kad(self) -> KadDHT:
        assert self.dht is not None, "the host is made in serve()"
        return self.dht

    @property
    def me(self) -> ID:
        assert self.peer_id is not None, "the host is made in serve()"
        return self.peer_id

    def listen_addrs(self) -> list[str]:
        """Announced multiaddrs including `/p2p/<id>`."""
        return [str(a) for a in self.host.get_addrs()] if self.host else []

    def own_addrs(self) -> list[Multiaddr]:
        suffix = Multiaddr(f"/p2p/{self.peer_id}")
        return [a.decapsulate(suffix) for a in self.host.get_addrs()]

    def own_info(self) -> PeerInfo:
        return PeerInfo(self.me, self.own_addrs())
