"""AGD as the paper writes it, in float64: the oracle for the standalone optimizer
(test_agd.py) and for the optimizer hm.wrap takes over (tests/runtime/test_wrap_optim.py)."""

from __future__ import annotations

import torch


def agd_paper(param: torch.Tensor, grads: list[torch.Tensor], *, lr: float,
              betas: tuple[float, float], delta: float, weight_decay: float):
    """Yue et al. (NeurIPS 2023), Algorithm 1 with decoupled weight decay, in float64:
    m_hat_t = m_t / (1 - b1^t); s_t = m_hat_t - m_hat_{t-1} (s_1 = m_hat_1);
    b_t = b2 b_{t-1} + (1 - b2) s_t^2; p -= lr m_hat_t / max(sqrt(b_t / (1 - b2^t)), delta).
    Returns the final parameter and, per step, where max() took delta."""
    b1, b2 = betas
    p = param.double().clone()
    m = torch.zeros_like(p)
    b = torch.zeros_like(p)
    m_hat_prev = torch.zeros_like(p)
    floored = []
    for t, g in enumerate(grads, start=1):
        p *= 1 - lr * weight_decay
        m = b1 * m + (1 - b1) * g.double()
        m_hat = m / (1 - b1**t)
        s = m_hat - m_hat_prev
        b = b2 * b + (1 - b2) * s * s
        root = (b / (1 - b2**t)).sqrt()
        floored.append(root < delta)
        p -= lr * m_hat / torch.clamp_min(root, delta)
        m_hat_prev = m_hat
    return p, floored


def gradients(n: int, steps: int, seed: int = 0) -> list[torch.Tensor]:
    """A fixed direction plus noise that dies out over the steps and is weaker for later
    elements: the difference s_t shrinks, so the floor binds more and more."""
    gen = torch.Generator().manual_seed(seed)
    base = torch.randn(n, generator=gen) * 1e-2
    weight = torch.logspace(0, -3, n)
    return [base + torch.randn(n, generator=gen) * 1e-2 * weight * 0.8**t for t in range(steps)]
