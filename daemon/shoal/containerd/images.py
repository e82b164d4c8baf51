"""Reading containerd's Images service: image records, and walking an image's blobs."""

from __future__ import annotations

from collections.abc import Collection

from shoal.containerd.api import images_pb2
from shoal.containerd.content import ContentReads
from shoal.containerd.model import ContainerdNotFound, Image
from shoal.containerd.walk import NodeImage, walk


class ImageReads(ContentReads):
    async def list_images(self) -> list[Image]:
        """Every named image of the namespace.

        CRI also records each image under its bare config digest (`sha256:…`); those records
        are no names a registry client asks for, so only names with a `/` are returned.
        """
        resp = await self._unary(
            "list images",
            self._api.images.List,
            images_pb2.ListImagesRequest(filters=['name~="^.+/"']),
        )
        return [Image.from_proto(img) for img in resp.images if "/" in img.name]

    async def get_image(self, name: str) -> Image | None:
        try:
            resp = await self._unary(
                f"get image {name}",
                self._api.images.Get,
                images_pb2.GetImageRequest(name=name),
            )
        except ContainerdNotFound:
            return None
        return Image.from_proto(resp.image)

    async def walk_image(self, image: Image, present: Collection[str] | None = None) -> NodeImage:
        """Every blob of `image` this node holds (see shoal.containerd.walk).

        `present` is the set of committed digests; pass one from `list_content()` when walking
        many images, else each blob is checked with Info.
        """
        if present is None:

            async def has(digest: str) -> bool:
                return await self.info(digest) is not None

        else:

            async def has(digest: str) -> bool:
                return digest in present

        return await walk(image.name, image.target, self.read_blob, has)
