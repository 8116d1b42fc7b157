"""How far a defense moved an image: PSNR and SSIM against the clean image (torchmetrics).

``data_range`` is always explicit (1.0 for [0,1] pixels), never inferred from the data: inferring
it from each batch would make the same images score differently in different batches.
"""

from __future__ import annotations

import torch

# torchmetrics is imported where it is used: its package import pulls in its text, audio and
# detection metrics (transformers, scipy.signal), ~7 s that a run's driver, which never scores an
# image, would otherwise pay before its first worker starts


def psnr(clean: torch.Tensor, other: torch.Tensor, data_range: float = 1.0) -> torch.Tensor:
    """Per-image PSNR in dB, 10·log10(data_range² / MSE), for [B,C,H,W] tensors (inf if equal)."""
    from torchmetrics.functional.image import peak_signal_noise_ratio

    return peak_signal_noise_ratio(
        other.double(), clean.double(), data_range=data_range, reduction="none", dim=(1, 2, 3)
    )


def ssim(clean: torch.Tensor, other: torch.Tensor, data_range: float = 1.0) -> torch.Tensor:
    """Per-image SSIM (Wang et al. 2004: 11×11 Gaussian window, σ = 1.5, K1 = 0.01, K2 = 0.03)."""
    from torchmetrics.functional.image import structural_similarity_index_measure

    return structural_similarity_index_measure(
        other.double(), clean.double(), data_range=data_range, reduction="none"
    )


def purification_quality(clean: torch.Tensor, purified: torch.Tensor, data_range: float = 1.0) -> dict[str, float]:
    """Mean PSNR (dB) and SSIM of ``purified`` against ``clean`` ([B,3,H,W])."""
    with torch.no_grad():
        return {
            "psnr": psnr(clean, purified, data_range).mean().item(),
            "ssim": ssim(clean, purified, data_range).mean().item(),
        }
