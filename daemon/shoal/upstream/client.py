"""One registry API request: authorised, challenged at most once, redirected safely."""

from __future__ import annotations

from collections.abc import Mapping

import aiohttp

from shoal.oci.digest import Digest
from shoal.oci.names import is_tag, parse_repository
from shoal.upstream.allowlist import Endpoint, origin
from shoal.upstream.auth import Authenticator, pull_scope
from shoal.upstream.errors import UpstreamDenied
from shoal.upstream.transport import Transport


class RegistryClient:
    def __init__(self, transport: Transport, auth: Authenticator) -> None:
        self.transport = transport
        self.auth = auth

    async def request(
        self,
        endpoint: Endpoint,
        method: str,
        repository: str,
        kind: str,
        reference: str,
        *,
        headers: Mapping[str, str] | None = None,
    ) -> aiohttp.ClientResponse:
        """`method /v2/<repository>/<kind>/<reference>`; the caller releases the response.

        A 401 from the registry itself is answered once (token or Basic) and the request
        repeated; a second 401, or any 403, raises UpstreamDenied. Other statuses are returned.
        """
        # Checked again (References are normally valid already): the path must stay a path.
        parse_repository(repository)
        if not is_tag(reference):
            Digest.parse(reference)
        url = endpoint.url(f"/v2/{repository}/{kind}/{reference}")
        scope = pull_scope(repository)
        auth = await self.auth.authorization(endpoint, scope)
        resp = await self.transport.send(method, url, headers=headers, auth=auth)
        if resp.status == 401 and origin(resp.url) == endpoint.origin:
            challenges = resp.headers.getall("WWW-Authenticate", [])
            resp.release()
            answer = await self.auth.on_challenge(endpoint, scope, challenges, auth)
            if answer is None:
                raise UpstreamDenied(f"{endpoint.registry} wants credentials for {repository}")
            resp = await self.transport.send(method, url, headers=headers, auth=answer)
        if resp.status in (401, 403):
            resp.release()
            raise UpstreamDenied(f"{endpoint.registry}: {resp.status} for {repository}")
        return resp
