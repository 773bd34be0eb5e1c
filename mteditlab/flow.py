"""Flow-matching math shared by sampling and RL.

Convention (rectified flow, as diffusers' ``FlowMatchEulerDiscreteScheduler``):
``x_σ = (1 − σ)·x0 + σ·ε``; the model predicts the velocity ``v = ε − x0``; sampling integrates
from σ = 1 (noise) to σ = 0 (data) with ``dt = σ_next − σ < 0``.
"""

from __future__ import annotations

import math

import torch
from diffusers import FlowMatchEulerDiscreteScheduler


def flow_sigmas(steps: int, shift: float = 1.0) -> torch.Tensor:
    """The scheduler's σ grid for ``steps`` Euler steps: ``steps + 1`` values from 1.0 down to 0.0."""
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)
    scheduler.set_timesteps(steps)
    return scheduler.sigmas.to(torch.float32)


def _expand(value: torch.Tensor | float, like: torch.Tensor) -> torch.Tensor:
    value = torch.as_tensor(value, dtype=like.dtype, device=like.device)
    return value.reshape(-1, *([1] * (like.dim() - 1))) if value.dim() else value


def ode_step(x: torch.Tensor, v: torch.Tensor, sigma, sigma_next) -> torch.Tensor:
    """Deterministic Euler step of the probability-flow ODE: ``x + (σ_next − σ)·v``."""
    return x + (_expand(sigma_next, x) - _expand(sigma, x)) * v


def sde_step_stats(x: torch.Tensor, v: torch.Tensor, sigma, sigma_next, noise_level: float = 0.7):
    """Mean and standard deviation of the Flow-GRPO SDE step (a Gaussian policy over ``x_next``).

    std_σ = a·sqrt(σ / (1 − σ))
    mean  = x·(1 + std_σ²/(2σ)·dt) + v·(1 + std_σ²·(1 − σ)/(2σ))·dt
    scale = std_σ·sqrt(−dt)

    σ must lie in (0, 1): the step at σ = 1 has unbounded std and is always taken as an ODE step.
    Returns ``(mean, scale)``, both broadcastable to ``x``; computed in fp32.
    """
    x, v = x.float(), v.float()
    sigma, sigma_next = _expand(sigma, x), _expand(sigma_next, x)
    dt = sigma_next - sigma
    std = noise_level * torch.sqrt(sigma / (1 - sigma))
    mean = x * (1 + std**2 / (2 * sigma) * dt) + v * (1 + std**2 * (1 - sigma) / (2 * sigma)) * dt
    return mean, std * torch.sqrt(-dt)


def gaussian_log_prob(sample: torch.Tensor, mean: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """log N(sample; mean, scale²), averaged over every non-batch dimension (shape ``[B]``)."""
    scale = scale.expand_as(mean)
    logp = -((sample.float() - mean) ** 2) / (2 * scale**2) - torch.log(scale) - 0.5 * math.log(2 * math.pi)
    return logp.flatten(1).mean(1)


def sde_step(x, v, sigma, sigma_next, noise_level: float = 0.7, generator: torch.Generator | None = None):
    """Sample ``x_next = mean + scale·ε`` and return ``(x_next, log_prob, mean, scale)``."""
    mean, scale = sde_step_stats(x, v, sigma, sigma_next, noise_level)
    noise = torch.randn(mean.shape, generator=generator, dtype=mean.dtype, device=mean.device)
    x_next = mean + scale * noise
    return x_next, gaussian_log_prob(x_next, mean, scale), mean, scale
