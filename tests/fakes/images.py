"""A small image (config and one 3 MiB layer) in a MemoryStore, as the pull-API tests serve it."""

from __future__ import annotations

import json

from shoal.oci import mediatypes as mt
from tests.fakes.store import MemoryStore

NS = "127.0.0.1:5000"
LAYER = bytes(range(256)) * 4096 * 3  # 3 MiB: several chunks, and over sendfile's hold-back


def build_image(store: MemoryStore) -> dict[str, object]:
    config = json.dumps({"architecture": "amd64", "os": "linux"}).encode()
    cdig, ldig = store.add(config), store.add(LAYER)
    # An OCI manifest without a mediaType field: its shape must decide the Content-Type.
    manifest = json.dumps(
        {
            "schemaVersion": 2,
            "config": {
                "mediaType": "application/vnd.oci.image.config.v1+json",
                "digest": str(cdig),
                "size": len(config),
            },
            "layers": [
                {
                    "mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                    "digest": str(ldig),
                    "size": len(LAYER),
                }
            ],
        }
    ).encode()
    desc = store.tag(f"{NS}/team/app:v1", mt.OCI_MANIFEST, manifest)
    return {"manifest": manifest, "mdig": desc.digest, "cdig": cdig, "ldig": ldig}
