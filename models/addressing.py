"""NTM memory addressing and access as pure, batched functions (Graves et al. 2014, sec. 3).

Shapes: B batch, H heads, N memory slots, W memory width. Every function takes and returns
tensors and holds no state, so the same code serves training (autograd) and inference
(``torch.inference_mode``) and any number of concurrent callers.
"""

from __future__ import annotations

import torch

COSINE_EPS = 1e-8
SHARPEN_EPS = 1e-12


def cosine_similarity(memory: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
    """K[u, v] = u.v / (|u| |v|) (eq. 6) of each key against each memory row.

    memory [B, N, W], key [B, H, W] -> [B, H, N]. The norms' product is clamped below so
    an all-zero key or row gives similarity 0 instead of NaN.
    """
    dot = torch.bmm(key, memory.transpose(1, 2))
    norms = key.norm(dim=-1, keepdim=True) * memory.norm(dim=-1).unsqueeze(1)
    return dot / norms.clamp_min(COSINE_EPS)


def content_weighting(memory: torch.Tensor, key: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
    """w_c = softmax(beta * K(k, M(i))) over slots (eq. 5).

    memory [B, N, W], key [B, H, W], beta [B, H, 1] (>= 0) -> [B, H, N].
    """
    return torch.softmax(beta * cosine_similarity(memory, key), dim=-1)


def interpolate(w_content: torch.Tensor, w_prev: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    """w_g = g * w_c + (1 - g) * w_{t-1} (eq. 7). gate [B, H, 1] in (0, 1).

    Computed as one ``lerp``: w_{t-1} + g * (w_c - w_{t-1}).
    """
    return torch.lerp(w_prev, w_content, gate)


def circular_shift(w: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """w~(i) = sum_j w_g(j) s(i - j), indices modulo N (eq. 8): a circular convolution.

    w [B, H, N], shift [B, H, 2R+1] holding the weights of the offsets -R..+R in order, so
    shift[..., R + k] moves weight from slot i to slot i + k. Vectorised over the batch and
    heads: one ``torch.roll`` and one fused multiply-add per offset, no loop over batch elements.
    """
    reach = (shift.shape[-1] - 1) // 2
    weight = shift.split(1, dim=-1)
    out = weight[reach] * w
    for offset in range(1, reach + 1):
        out = torch.addcmul(out, weight[reach + offset], torch.roll(w, offset, -1))
        out = torch.addcmul(out, weight[reach - offset], torch.roll(w, -offset, -1))
    return out


def sharpen(w: torch.Tensor, gamma: torch.Tensor) -> torch.Tensor:
    """w(i) = w~(i)^gamma / sum_j w~(j)^gamma (eq. 9). gamma [B, H, 1] >= 1.

    Computed as softmax(gamma * log(w~ + eps)) so that a large gamma cannot underflow every
    term to zero (which would divide 0 by 0).
    """
    return torch.softmax(gamma * torch.log(w + SHARPEN_EPS), dim=-1)


def address(
    memory: torch.Tensor,
    w_prev: torch.Tensor,
    key: torch.Tensor,
    beta: torch.Tensor,
    gate: torch.Tensor,
    shift: torch.Tensor,
    gamma: torch.Tensor,
) -> torch.Tensor:
    """The whole addressing pipeline of Fig. 2: content, interpolation, shift, sharpening."""
    w_content = content_weighting(memory, key, beta)
    w_gated = interpolate(w_content, w_prev, gate)
    return sharpen(circular_shift(w_gated, shift), gamma)


def read(memory: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """r = sum_i w(i) M(i) (eq. 2): memory [B, N, W], w [B, N] -> [B, W]."""
    return torch.bmm(w.unsqueeze(1), memory).squeeze(1)


def write(memory: torch.Tensor, w: torch.Tensor, erase: torch.Tensor, add: torch.Tensor) -> torch.Tensor:
    """M <- M * (1 - w e^T) + w a^T (eqs. 3 and 4), returning a new tensor.

    memory [B, N, W], w [B, N], erase [B, W] in (0, 1), add [B, W].
    Computed as M + w a^T - M * (w e^T): one ``baddbmm``, then ``addcmul_`` into its fresh output.
    """
    w_col = w.unsqueeze(-1)
    return torch.baddbmm(memory, w_col, add.unsqueeze(1)).addcmul_(memory, w_col * erase.unsqueeze(1), value=-1)
