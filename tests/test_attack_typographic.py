"""The typographic (FigStep-style) attack: visible text drawn into the image, nothing else changed."""

from __future__ import annotations

import pytest
import torch

from attacks.typographic import Typographic
from harness.contracts import CLEAN_THREAT, AttackBatch, ThreatModel
from harness.registry import Entry, ParamError

LINF8 = ThreatModel("linf-8", "linf", 8 / 255)


@pytest.fixture(scope="module")
def batch(tiny_victim, vqa_task) -> AttackBatch:
    samples = vqa_task.samples("test", 8, 0)
    pixels = tiny_victim.prepare([s.image for s in samples]).to(tiny_victim.device)
    return AttackBatch(pixels, [s.prompt for s in samples], [vqa_task.attack_targets(s)[0] for s in samples], "vqa",
                       seeds=list(range(8)))


class NoAccess:
    def loss(self, *args, **kwargs):
        raise AssertionError("the typographic attack needs no loss")

    def generate(self, *args, **kwargs):
        raise AssertionError("the typographic attack needs no queries")


def _region(bbox: tuple[int, int, int, int], shape: tuple[int, int], pad: int = 0) -> torch.Tensor:
    x0, y0, x1, y1 = bbox
    region = torch.zeros(shape, dtype=torch.bool)
    region[max(0, y0 - pad) : y1 + pad, max(0, x0 - pad) : x1 + pad] = True
    return region


def _changed(result: torch.Tensor, clean: torch.Tensor) -> torch.Tensor:
    return (result != clean).any(dim=1)  # [B,H,W]


@pytest.mark.parametrize("position", ["bottom", "top", "center", (3, 5)])
def test_pixels_change_only_inside_the_text(batch, position) -> None:
    attack = Typographic(text="red", position=position)
    assert set(attack.layers((32, 32))[0].flatten().tolist()) == {0.0, 1.0}, "hard-edged by default"
    result = attack.perturb(NoAccess(), batch, CLEAN_THREAT, torch.Generator())
    clean = batch.pixels
    assert result.pixels.shape == clean.shape and result.pixels.dtype == clean.dtype
    assert result.pixels.min() >= 0 and result.pixels.max() <= 1
    alpha, _, bbox = attack.layers((32, 32))
    region = _region(bbox, (32, 32))
    changed = _changed(result.pixels, clean)
    assert region.sum() > 0 and region.sum() < 32 * 32 / 2, bbox
    for i in range(changed.shape[0]):
        assert changed[i].any(), "the text must be visible in every image"
        assert not (changed[i] & ~region).any(), f"pixels changed outside the text box {bbox}"
    # pixels fully covered by a glyph take the text colour exactly
    full = torch.from_numpy(alpha == 1.0)
    assert full.any()
    assert torch.allclose(result.pixels[:, :, full], torch.ones(1), atol=1e-6)  # white
    assert (result.pixels - clean).abs().max() > 0.5, "an unbounded, visible attack"


def test_antialiased_text_also_stays_in_its_box(batch) -> None:
    attack = Typographic(text="blue", antialias=True, colour="#ff0000")
    result = attack.perturb(NoAccess(), batch, CLEAN_THREAT, torch.Generator())
    alpha, _, bbox = attack.layers((32, 32))
    assert ((alpha > 0) & (alpha < 1)).any(), "soft edges"
    changed = _changed(result.pixels, batch.pixels)
    assert changed.any(dim=(1, 2)).all() and not (changed & ~_region(bbox, (32, 32))).any()
    assert result.pixels.min() >= 0 and result.pixels.max() <= 1


def test_positions_move_the_text(batch) -> None:
    boxes = {p: Typographic(text="red", position=p).layers((32, 32))[2] for p in ("top", "center", "bottom")}
    top, center, bottom = (boxes[p][1] for p in ("top", "center", "bottom"))
    assert top < center < bottom, boxes
    assert boxes["bottom"][3] <= 32 and boxes["top"][1] >= 0
    offset = Typographic(text="red", position=(3, 5)).layers((32, 32))[2]
    assert offset[0] >= 3 and offset[1] >= 5


def test_box_fills_the_padded_text_box(batch) -> None:
    attack = Typographic(text="no", box=True, box_colour="black", colour="yellow", box_padding=1)
    result = attack.perturb(NoAccess(), batch, CLEAN_THREAT, torch.Generator())
    alpha, mask, bbox = attack.layers((32, 32))
    region = _region(bbox, (32, 32), pad=1)
    assert torch.equal(torch.from_numpy(mask), region)
    changed = _changed(result.pixels, batch.pixels)
    assert not (changed & ~region).any()
    background = region & torch.from_numpy(alpha == 0)
    assert background.any() and (result.pixels[:, :, background] == 0).all()  # the black box
    full = torch.from_numpy(alpha == 1.0)
    yellow = torch.tensor([255, 255, 0])  # PIL's 'yellow'
    assert torch.allclose(result.pixels[:, :, full].permute(0, 2, 1), yellow.float() / 255, atol=1e-6)


def test_ignores_the_threat_model_and_needs_no_access(batch) -> None:
    attack = Typographic(text="yes")
    assert attack.requires == "none" and attack.uses_threat is False
    assert attack.passes_per_sample() == (0, 0)
    # the runner hands attacks without a threat model the clean threat (eps 0): still drawn
    clean_threat = attack.perturb(NoAccess(), batch, CLEAN_THREAT, torch.Generator())
    other = attack.perturb(NoAccess(), batch, LINF8, torch.Generator().manual_seed(5))
    assert torch.equal(clean_threat.pixels, other.pixels)
    assert not torch.equal(clean_threat.pixels, batch.pixels)
    assert (clean_threat.pixels - batch.pixels).abs().max() > LINF8.eps


def test_target_text(batch) -> None:
    assert Typographic(text=" red ").target_text == "red"
    assert Typographic(text="red", targeted=False).target_text is None


def test_wrapped_text_is_taller() -> None:
    one = Typographic(text="red blue", font_size=8, position="top").layers((32, 32))[2]
    two = Typographic(text="red blue", font_size=8, position="top", wrap=4).layers((32, 32))[2]
    assert two[3] - two[1] > one[3] - one[1]


def test_parameter_errors_are_clear(batch) -> None:
    with pytest.raises(ValueError, match="text must be a non-empty"):
        Typographic(text="  ")
    with pytest.raises(ValueError, match="position must be one of bottom, top"):
        Typographic(text="red", position="left")
    with pytest.raises(ValueError, match="position"):
        Typographic(text="red", position=(1, 2, 3))
    with pytest.raises(ValueError, match="colour must be a colour name"):
        Typographic(text="red", colour="reddish")
    with pytest.raises(ValueError, match="font_size"):
        Typographic(text="red", font_size=0)
    with pytest.raises(ValueError, match="outside the 32x32 image"):
        Typographic(text="red", position=(40, 40)).perturb(NoAccess(), batch, CLEAN_THREAT, torch.Generator())
    entry = Entry("attack", "typographic", Typographic, "", "test", "-", "-")
    with pytest.raises(ParamError, match="'text': is required"):
        entry.create({})
    with pytest.raises(ParamError, match="'font': is not a parameter"):
        entry.create({"text": "red", "font": 3})
    attack = entry.create({"text": "red", "position": [2, 20]})  # YAML writes pairs as lists
    assert attack.position == (2, 20)


def test_registered_name() -> None:
    from harness.plugins import get_plugins

    attacks = get_plugins().attacks
    if "typographic" not in attacks:
        pytest.skip("typographic is not registered in attacks/plugin.py yet")
    assert attacks.get("typographic").factory is Typographic
