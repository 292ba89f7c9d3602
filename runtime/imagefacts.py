"""Image facts for the planner: read once from the SIF's header and metadata objects."""

from __future__ import annotations

import os
from typing import Optional

from rankwire.errors import UserError
from rankwire.runtime.imagemeta import read_image_metadata
from rankwire.runtime.plan import ImageFacts
from rankwire.runtime.sif_read import SifImage


def image_facts(path: str, fd: Optional[int] = None) -> ImageFacts:
    """Partition location, %environment, runscript presence and identity of a SIF.

    `fd`: read the image already open there (the SPANK check); `path` only names it.
    """
    if fd is None and not os.path.exists(path):
        raise UserError(f"image {path} not found: check the path")
    if fd is None and os.path.isdir(path):
        raise UserError(f"{path} is a directory: rankwire runs SIF files (see rankwire build)")
    image = SifImage.open(path) if fd is None else SifImage.open_fd(fd, path)
    try:
        meta = read_image_metadata(image)
    finally:
        image.close()
    return ImageFacts(
        path=os.path.abspath(path),
        partition_offset=meta.partition_offset,
        partition_size=meta.partition_size,
        digest=meta.identity.split(":", 1)[-1][:32],
        env=dict(meta.env),
        has_runscript=meta.runscript is not None,
    )
