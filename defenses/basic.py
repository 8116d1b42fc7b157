"""``none`` and ``jpeg``: the undefended baseline and JPEG re-compression as a purifier."""

from __future__ import annotations

import io
from typing import Annotated

import numpy as np
import torch
from PIL import Image
from pydantic import Field

from harness.contracts import Defense


class NoDefense(Defense):
    """The undefended victim."""


class JpegDefense(Defense):
    """Re-encode each image as JPEG at ``quality`` and decode it (Dziugaite et al. 2016).

    Quantisation has no useful gradient, so an adaptive attack must use BPDA (identity).
    """

    stochastic = False
    differentiable = False
    bpda = "identity"

    def __init__(self, *, quality: Annotated[int, Field(ge=1, le=95)] = 75):
        if not 1 <= quality <= 95:
            raise ValueError("quality must be between 1 and 95 (PIL's useful range)")
        self.quality = quality

    def purify(self, pixels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        out = []
        for image in pixels.detach().cpu():
            array = (image.permute(1, 2, 0).numpy() * 255.0).round().clip(0, 255).astype(np.uint8)
            buffer = io.BytesIO()
            Image.fromarray(array).save(buffer, format="JPEG", quality=self.quality)
            decoded = np.asarray(Image.open(buffer).convert("RGB"), dtype=np.float32) / 255.0
            out.append(torch.from_numpy(decoded).permute(2, 0, 1))
        return torch.stack(out).to(device=pixels.device, dtype=pixels.dtype)
