"""A trained checkpoint is reproducible from its seed: the same key trained twice gives the same
weights, even with several torch threads (where PyTorch's defaults are not run-to-run stable)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from harness.reproducible import deterministic
from harness.victims.shapes_vlm import ShapesVLMConfig, train_shapes_vlm


def _weights(directory: Path) -> dict[str, torch.Tensor]:
    weights: dict[str, torch.Tensor] = {}
    for path in sorted(directory.rglob("*.safetensors")):
        weights.update(load_file(str(path)))
    return weights


def test_victim_training_is_bit_identical_with_two_threads(tmp_path: Path, codefend_home: Path, vqa_task) -> None:
    from harness.plugins import get_plugins

    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        records = [train_shapes_vlm(ShapesVLMConfig(steps=40), tmp_path / str(i), get_plugins().tasks, progress=False)
                   for i in range(2)]
    finally:
        torch.set_num_threads(threads)
    first, second = _weights(tmp_path / "0"), _weights(tmp_path / "1")
    assert first.keys() == second.keys() and first
    changed = [name for name in first if not torch.equal(first[name], second[name])]
    assert not changed, f"the same seed trained to different weights in {len(changed)} tensors, e.g. {changed[:3]}"
    assert records[0]["threads"] == 2 and records[0]["deterministic"] is True


def test_deterministic_restores_the_previous_setting() -> None:
    assert not torch.are_deterministic_algorithms_enabled()
    with deterministic():
        assert torch.are_deterministic_algorithms_enabled()
    assert not torch.are_deterministic_algorithms_enabled()
    with pytest.raises(RuntimeError):
        with deterministic():
            raise RuntimeError("a failed training")
    assert not torch.are_deterministic_algorithms_enabled()
