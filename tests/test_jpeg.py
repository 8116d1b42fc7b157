"""The ``jpeg`` defense: a real purifier with honest declarations and validated parameters."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from defenses.basic import JpegDefense, NoDefense
from harness.contracts import Defense
from harness.plugins import load_plugins
from harness.registry import ParamError
from harness.suite import SuiteError, load_suite

FIXTURES = Path(__file__).resolve().parent / "fixtures"


@pytest.fixture(scope="module")
def pixels() -> torch.Tensor:
    """Shapes-like images: flat backgrounds with coloured blocks and some noise, [4,3,32,32] in [0,1]."""
    rng = np.random.default_rng(0)
    images = np.ones((4, 32, 32, 3), dtype=np.float32)
    for i in range(4):
        y, x = rng.integers(2, 18, size=2)
        images[i, y : y + 12, x : x + 12] = rng.random(3)
        images[i] += rng.normal(0, 0.03, size=(32, 32, 3)).astype(np.float32)
    images[0, :4, :4] = 0.0  # saturated corners exercise the [0,1] clamp
    return torch.from_numpy(images.clip(0, 1)).permute(0, 3, 1, 2).contiguous()


def _generator() -> torch.Generator:
    return torch.Generator().manual_seed(0)


def test_jpeg_changes_pixels_and_keeps_shape_dtype_and_range(pixels: torch.Tensor) -> None:
    before = pixels.clone()
    out = JpegDefense(quality=75).purify(pixels, _generator())
    assert out.shape == pixels.shape and out.dtype == pixels.dtype and out.device == pixels.device
    assert out.min() >= 0.0 and out.max() <= 1.0
    assert not torch.equal(out, pixels)
    assert (out - pixels).abs().mean() > 1e-3
    # a purifier, not a scrambler: the image is still close to what went in
    assert (out - pixels).abs().mean() < 0.1
    assert torch.equal(pixels, before), "purify must not modify its input"


def test_jpeg_is_deterministic_and_quality_matters(pixels: torch.Tensor) -> None:
    q75 = JpegDefense(quality=75).purify(pixels, _generator())
    assert torch.equal(q75, JpegDefense(quality=75).purify(pixels, torch.Generator().manual_seed(99)))
    error = {q: (JpegDefense(quality=q).purify(pixels, _generator()) - pixels).abs().mean().item() for q in (10, 95)}
    assert error[10] > error[95]


def test_jpeg_output_is_on_the_8_bit_grid(pixels: torch.Tensor) -> None:
    out = JpegDefense().purify(pixels.double(), _generator())
    assert out.dtype == torch.float64
    assert torch.allclose(out * 255, (out * 255).round(), atol=1e-6)


def test_jpeg_declarations() -> None:
    jpeg = JpegDefense()
    assert isinstance(jpeg, Defense)
    assert jpeg.quality == 75
    assert (JpegDefense.differentiable, JpegDefense.bpda, JpegDefense.stochastic) == (False, "approximate", False)
    assert jpeg.rewrite(["what shape is it?"]) == ["what shape is it?"]
    assert (NoDefense.differentiable, NoDefense.stochastic) == (True, False)


@pytest.mark.parametrize("quality", [0, 96, -5, 200])
def test_quality_out_of_range_is_rejected(quality: int) -> None:
    with pytest.raises(ValueError, match="quality must be between 1 and 95"):
        JpegDefense(quality=quality)
    with pytest.raises((ValueError, ParamError), match="quality"):
        load_plugins().defenses.create("jpeg", {"quality": quality})


@pytest.mark.parametrize("quality", [1, 95])
def test_quality_bounds_are_accepted(quality: int, pixels: torch.Tensor) -> None:
    out = JpegDefense(quality=quality).purify(pixels[:1], _generator())
    assert out.shape == (1, 3, 32, 32)


@pytest.mark.parametrize(
    ("value", "key", "says"),
    [(150, "defenses[1].params.quality", "less than or equal to 95"),
     ("high", "defenses[1].params.quality", "valid integer")],
    ids=["out-of-range", "not-an-int"],
)
def test_suite_reports_bad_quality_with_the_key(value, key: str, says: str, tmp_path: Path) -> None:
    shutil.copy(FIXTURES / "suites" / "base.yaml", tmp_path / "base.yaml")
    path = tmp_path / "suite.yaml"
    path.write_text(f"include: base.yaml\ndefenses:\n  - name: none\n  - name: jpeg\n    params: {{quality: {value}}}\n")
    with pytest.raises(SuiteError) as info:
        load_suite(path, load_plugins())
    assert info.value.key == key
    assert says in str(info.value) and "quality" in str(info.value)
    assert str(info.value).startswith(f"{path.resolve()}: {key}: ")
