"""A trained checkpoint is reproducible from its seed: the same key trained twice gives the same
weights, whatever the caller's thread count (PyTorch's defaults are not run-to-run stable with
several threads, and a matrix product's rounding follows the thread count)."""

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


def test_victim_training_is_bit_identical_whatever_the_caller_s_thread_count(tmp_path: Path, codefend_home: Path,
                                                                               vqa_task) -> None:
    """A two-worker run trains at one thread per worker, a benchmark in one process at two: the
    same key must give the same weights (once it did not: 5e-4 apart, a question flipped)."""
    from harness.plugins import get_plugins

    threads = torch.get_num_threads()
    records = []
    try:
        for i, caller_threads in enumerate((2, 2, 1)):
            torch.set_num_threads(caller_threads)
            records.append(train_shapes_vlm(ShapesVLMConfig(steps=40), tmp_path / str(i), get_plugins().tasks,
                                            progress=False))
            assert torch.get_num_threads() == caller_threads  # given back
    finally:
        torch.set_num_threads(threads)
    first = _weights(tmp_path / "0")
    assert first
    for other in ("1", "2"):
        second = _weights(tmp_path / other)
        assert first.keys() == second.keys()
        changed = [name for name in first if not torch.equal(first[name], second[name])]
        assert not changed, f"the same seed trained to different weights in {len(changed)} tensors, e.g. {changed[:3]}"
    assert all(r["threads"] == 1 and r["deterministic"] is True for r in records)


def test_deterministic_restores_the_previous_setting() -> None:
    assert not torch.are_deterministic_algorithms_enabled()
    with deterministic():
        assert torch.are_deterministic_algorithms_enabled()
    assert not torch.are_deterministic_algorithms_enabled()
    with pytest.raises(RuntimeError):
        with deterministic():
            raise RuntimeError("a failed training")
    assert not torch.are_deterministic_algorithms_enabled()
