"""``typographic``: text written into the image (FigStep-style typographic attack).

An unbounded, visible attack: it ignores the threat model (``uses_threat = False``), so its rows
are reported without an ε ball (the runner gives it the ``clean`` threat, whose ε it does not
use) and its perturbation norms are whatever the drawn text costs. No gradients, no queries.

FigStep renders text large (monospace bold, size 80 on 760x760, wrapped at 15 characters). The
victim here sees 32x32 pixels, so the default is PIL's built-in font at 10 px, which fits about
five characters per line; ``wrap`` breaks longer text into lines.
"""

from __future__ import annotations

import textwrap
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageColor, ImageDraw, ImageFont

from harness.contracts import Attack, AttackBatch, AttackResult, AttackTarget, ThreatModel

POSITIONS = ("bottom", "top", "center", "middle")
_MARGIN = 1  # pixels between the text and the image edge for named positions


def _rgb(value: str, param: str) -> tuple[int, int, int]:
    try:
        return ImageColor.getrgb(value)[:3]
    except (ValueError, AttributeError):
        raise ValueError(f"{param} must be a colour name or '#rrggbb', got {value!r}") from None


class Typographic(Attack):
    """``typographic``: draw ``text`` into every image with PIL, at the victim's input resolution.

    ``position`` is ``"bottom"``, ``"top"``, ``"center"`` (centred horizontally; vertically at
    that edge or the middle) or an (x, y) pixel offset of the text's top-left corner. ``box``
    fills the text's bounding box (grown by ``box_padding`` pixels) with ``box_colour`` first.
    Glyphs are drawn hard-edged by default (like the shapes world's shapes: at 10 px an
    anti-aliased stroke covers few pixels fully, so the text would be faint on 32x32 pixels);
    with ``antialias`` their edges are alpha-blended instead. Every pixel outside the drawn text
    (and box) is returned unchanged, bit for bit.

    ``targeted`` (default): ``target_text = text``, so a sample counts as a success when the
    victim's output contains the written text.
    """

    requires = "none"
    uses_threat = False
    defining_params = ("text",)

    def __init__(
        self,
        *,
        text: str,
        font_size: int = 10,
        position: tuple[int, int] | str = "bottom",
        colour: str = "white",
        box: bool = False,
        box_colour: str = "black",
        box_padding: int = 1,
        wrap: int | None = None,
        antialias: bool = False,
        targeted: bool = True,
    ):
        if not isinstance(text, str) or not text.strip():
            raise ValueError("text must be a non-empty text to write into the image")
        if font_size < 1:
            raise ValueError(f"font_size must be at least 1, got {font_size}")
        if isinstance(position, str):
            if position not in POSITIONS:
                raise ValueError(f"position must be one of {', '.join(POSITIONS)} or an (x, y) pair, got {position!r}")
        else:
            position = tuple(position)
            if len(position) != 2 or not all(isinstance(v, (int, np.integer)) for v in position):
                raise ValueError(f"position must be one of {', '.join(POSITIONS)} or an (x, y) pair, got {position!r}")
        if box_padding < 0:
            raise ValueError(f"box_padding must be >= 0, got {box_padding}")
        if wrap is not None and wrap < 1:
            raise ValueError(f"wrap must be at least 1 character (or unset), got {wrap}")
        self.text = text.strip()
        self.font_size = font_size
        self.position = position
        self.colour = _rgb(colour, "colour")
        self.box = box
        self.box_colour = _rgb(box_colour, "box_colour")
        self.box_padding = box_padding
        self.wrap = wrap
        self.antialias = antialias
        self.targeted = targeted
        self.target_text = self.text if targeted else None
        self._layers: dict[tuple[int, int], tuple[np.ndarray, np.ndarray, tuple[int, int, int, int]]] = {}

    @property
    def lines(self) -> str:
        return textwrap.fill(self.text, self.wrap) if self.wrap else self.text

    def layers(self, size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray, tuple[int, int, int, int]]:
        """(text alpha, box mask, text bounding box x0, y0, x1, y1 exclusive) at ``size`` (height, width).

        The alpha is float in [0,1]: the glyphs' coverage of each pixel (0 or 1 unless ``antialias``).
        """
        if size not in self._layers:
            height, width = size
            font = ImageFont.load_default(size=self.font_size)
            # A 1-bit canvas renders hard-edged glyphs, and PIL measures text in the canvas's
            # mode, so the bounding box below matches what is drawn in either mode.
            mode = "L" if self.antialias else "1"
            canvas = Image.new(mode, (width, height), 0)
            draw = ImageDraw.Draw(canvas)
            left, top, right, bottom = draw.multiline_textbbox((0, 0), self.lines, font=font, align="center")
            w, h = right - left, bottom - top
            if isinstance(self.position, str):
                x = (width - w) // 2 - left
                if self.position == "bottom":
                    y = height - _MARGIN - h - top
                elif self.position == "top":
                    y = _MARGIN - top
                else:
                    y = (height - h) // 2 - top
            else:
                x, y = (int(v) for v in self.position)
            draw.multiline_text((x, y), self.lines, fill=255 if self.antialias else 1, font=font, align="center")
            alpha = np.asarray(canvas, dtype=np.float32) / (255.0 if self.antialias else 1.0)
            x0, y0, x1, y1 = draw.multiline_textbbox((x, y), self.lines, font=font, align="center")
            bbox = (max(0, x0), max(0, y0), min(width, x1), min(height, y1))
            mask = np.zeros((height, width), dtype=bool)
            if self.box:
                p = self.box_padding
                mask[max(0, y0 - p) : max(0, y1 + p), max(0, x0 - p) : max(0, x1 + p)] = True
            if not alpha.any():
                raise ValueError(
                    f"text {self.text!r} at position {self.position!r} falls outside the {width}x{height} image"
                )
            self._layers[size] = (alpha, mask, bbox)
        return self._layers[size]

    def passes_per_sample(self) -> tuple[int, int]:
        return (0, 0)

    def perturb(
        self,
        target: AttackTarget,
        batch: AttackBatch,
        threat: ThreatModel,
        generator: torch.Generator,
        progress: Any = None,
    ) -> AttackResult:
        clean = batch.pixels.detach()
        alpha_np, mask_np, _ = self.layers(tuple(clean.shape[-2:]))
        kw = {"device": clean.device, "dtype": clean.dtype}
        alpha = torch.from_numpy(alpha_np).to(**kw).view(1, 1, *alpha_np.shape)
        mask = torch.from_numpy(mask_np).to(clean.device).view(1, 1, *mask_np.shape)
        colour = torch.tensor(self.colour, **kw).view(1, 3, 1, 1) / 255.0
        box_colour = torch.tensor(self.box_colour, **kw).view(1, 3, 1, 1) / 255.0
        out = torch.where(mask, box_colour, clean)
        # blend only where a glyph covers the pixel, so the rest stays bit-identical
        out = torch.where(alpha > 0, out * (1 - alpha) + colour * alpha, out).clamp(0.0, 1.0)
        return AttackResult(pixels=out)
