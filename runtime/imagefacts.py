"""Image facts for the planner: read once from the SIF's header and metadata objects."""

from __future__ import annotations

import os

from rankwire.errors import UserError
from rankwire.runtime.build import read_image_metadata
from rankwire.runtime.plan import ImageFacts
from rankwire.runtime.sif import SifImage


def image_facts(path: str) -> ImageFacts:
    """Partition location, %environment, runscript presence and identity of a SIF."""
    if not os.path.exists(path):
        raise UserError(f"image {path} not found: check the path")
    if os.path.isdir(path):
        raise UserError(f"{path} is a directory: rankwire runs SIF files (see rankwire build)")
    image = SifImage.open(path)
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
