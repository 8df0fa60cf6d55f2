"""Fixed-form initialisations for the Pathfinder input layer: a Gabor bank plus one DoG.

The paper's input layer is a bank of 7x7 filters, all but one initialised as Gabors
(oriented edge / bar detectors, even and odd phase) and one as a difference of Gaussians
(a centre-surround blob detector that sees the marker dot). Every filter is zero-mean and
has unit L2 norm, so a flat background gives no response and the squared outputs of all
filters share one scale.
"""
from __future__ import annotations

import math

import torch


def _grid(size: int) -> tuple[torch.Tensor, torch.Tensor]:
    half = (size - 1) / 2.0
    coords = torch.arange(size, dtype=torch.float64) - half
    return torch.meshgrid(coords, coords, indexing="ij")


def _zero_mean_unit_norm(kernel: torch.Tensor) -> torch.Tensor:
    kernel = kernel - kernel.mean()
    return kernel / kernel.norm().clamp_min(1e-12)


def gabor_kernel(size: int, theta: float, phase: float, wavelength: float, sigma: float) -> torch.Tensor:
    """One ``size x size`` Gabor at orientation ``theta`` (radians) and ``phase``."""
    y, x = _grid(size)
    along = x * math.cos(theta) + y * math.sin(theta)
    across = -x * math.sin(theta) + y * math.cos(theta)
    envelope = torch.exp(-(along**2 + across**2) / (2 * sigma**2))
    return _zero_mean_unit_norm(envelope * torch.cos(2 * math.pi * across / wavelength + phase))


def dog_kernel(size: int, sigma_center: float, sigma_surround: float) -> torch.Tensor:
    """Centre-on difference of Gaussians, zero-mean and unit norm."""
    y, x = _grid(size)
    r2 = x**2 + y**2
    center = torch.exp(-r2 / (2 * sigma_center**2)) / sigma_center**2
    surround = torch.exp(-r2 / (2 * sigma_surround**2)) / sigma_surround**2
    return _zero_mean_unit_norm(center - surround)


def gabor_dog_bank(num_filters: int, size: int = 7) -> torch.Tensor:
    """``(num_filters, 1, size, size)``: ``num_filters - 1`` Gabors and one DoG (last).

    Gabors alternate even / odd phase over ``ceil((num_filters - 1) / 2)`` orientations
    spread evenly over ``[0, pi)``; wavelength and envelope scale with ``size``.
    """
    if num_filters < 2:
        raise ValueError(f"The Gabor + DoG bank needs at least 2 filters; got {num_filters}.")
    if size < 3 or size % 2 == 0:
        raise ValueError(f"Input filter size must be an odd integer >= 3; got {size}.")
    num_gabor = num_filters - 1
    num_orient = math.ceil(num_gabor / 2)
    wavelength, sigma = size * 0.6, size / 4.0
    filters = []
    for i in range(num_gabor):
        theta = math.pi * (i // 2) / num_orient
        filters.append(gabor_kernel(size, theta, (i % 2) * math.pi / 2, wavelength, sigma))
    filters.append(dog_kernel(size, sigma_center=size / 10.0, sigma_surround=size / 4.0))
    return torch.stack(filters).unsqueeze(1).float()
