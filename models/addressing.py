"""NTM memory addressing and access as pure, batched functions (Graves et al. 2014, sec. 3).

Shapes: B batch, H heads, N memory slots, W memory width. Every function takes and returns
tensors and holds no state, so the same code serves training (autograd) and inference
(``torch.inference_mode``) and any number of concurrent callers.
"""

from __future__ import annotations

import torch

from models.tracing import tracing

COSINE_EPS = 1e-8
SHARPEN_EPS = 1e-12


def fused_products(memory: torch.Tensor, other: torch.Tensor) -> bool:
    """True while a graph without autograd is traced (``models.tracing``): memory products then go as multiply-and-sums.

    A session's products with its memory (the keys' dot products with every slot, the read) are
    matrix products of one or two rows, a batch of them per call. As ``bmm`` they are one
    library call each that inductor cannot fuse with anything. As a multiply and a sum over the
    memory's width, inductor generates them as reductions inside its loop over the sessions,
    together with the norms and the softmaxes that use them and, for the read, beside the write:
    fewer passes over the memory, the step's largest tensor. The fast model's compiled
    recurrent step, two threads, interleaved: 576 and 1,093 us at 65 and 129 rows against 647
    and 1,243 with ``bmm``; at 16, 64 and 256 rows 4-7% faster, within one cell's noise; on one
    thread ahead at three of five sizes, 13% behind at 129 rows (``python -m
    bench.compiled_shapes``, ``docs/benchmarks.md``). Measured for the NTM heads only; the LRUA
    and keyed reads take the same path. Eager keeps ``bmm`` (one call against a multiply's
    [B, H, N, W] temporary), and so does a traced training step (its backward would keep that
    temporary).
    """
    return tracing() and not (memory.requires_grad or other.requires_grad)


def cosine_similarity(memory: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
    """K[u, v] = u.v / (|u| |v|) (eq. 6) of each key against each memory row.

    memory [B, N, W], key [B, H, W] -> [B, H, N]. The norms' product is clamped below so
    an all-zero key or row gives similarity 0 instead of NaN. The dot products are a batched
    matrix product, or a multiply-and-sum in a traced inference graph (``fused_products``).
    """
    if fused_products(memory, key):
        dot = (key.unsqueeze(2) * memory.unsqueeze(1)).sum(-1)
    else:
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

    w [B, H, N], shift [B, H, 2R+1] holding the weights of the offsets -R..+R in order (R < N,
    ``NTMConfig.shift_range``), so shift[..., R + k] moves weight from slot i to slot i + k.
    Vectorised over the batch and heads: w is padded circularly by R slots at each end (its last
    R slots before it, its first R after it), so that w rolled by k is the contiguous slice
    padded[R - k : R - k + N], and each offset is one fused multiply-add of a slice. The same
    values as one ``torch.roll`` per offset, bit for bit (test); in a graph that inductor
    compiles, a slice is a plain vector load where a roll is a gather with a modulo per slot.
    The fast model's compiled recurrent step against the same graph with rolls (``python -m
    bench.compiled_shapes --ways served "roll shift"``, the two interleaved, 15 repeats, an
    Intel Xeon with AVX-512), us a call at 16, 64, 129 and 256 rows: 546, 852, 2,378, 3,188
    against 554, 924, 2,807, 3,425 on two threads; 523, 1,224, 3,130, 5,534 against 535, 1,267,
    3,247, 5,700 on one: 1-15% and 2-4% faster. With six ways in the rotation the same bench
    that hour was noisier than the difference (``docs/benchmarks.md``).
    """
    reach = (shift.shape[-1] - 1) // 2
    slots = w.shape[-1]
    padded = torch.cat([w[..., slots - reach :], w, w[..., :reach]], dim=-1)
    weight = shift.split(1, dim=-1)
    out = weight[reach] * w
    for offset in range(1, reach + 1):
        out = torch.addcmul(out, weight[reach + offset], padded[..., reach - offset : reach - offset + slots])
        out = torch.addcmul(out, weight[reach - offset], padded[..., reach + offset : reach + offset + slots])
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
    """r = sum_i w(i) M(i) (eq. 2): memory [B, N, W], w [B, N] -> [B, W].

    A batched matrix product, or a multiply-and-sum in a traced inference graph (``fused_products``).
    """
    if fused_products(memory, w):
        return (w.unsqueeze(-1) * memory).sum(1)
    return torch.bmm(w.unsqueeze(1), memory).squeeze(1)


def write(memory: torch.Tensor, w: torch.Tensor, erase: torch.Tensor, add: torch.Tensor) -> torch.Tensor:
    """M <- M * (1 - w e^T) + w a^T (eqs. 3 and 4), returning a new tensor.

    memory [B, N, W], w [B, N], erase [B, W] in (0, 1), add [B, W].
    Computed as M - w (M e - a), row-wise: two fused ``addcmul`` passes over the memory, the
    fewest for this update (the memory is the step's largest tensor: a third less time than
    forming w e^T and w a^T).
    """
    change = torch.addcmul(add.neg().unsqueeze(1), memory, erase.unsqueeze(1))
    return torch.addcmul(memory, w.unsqueeze(-1), change, value=-1)


# ------------------------------------------------------------------ least recently used access


def least_used(usage: torch.Tensor, count: int) -> torch.Tensor:
    """w_lu: one one-hot row per write head, marking the ``count`` least-used slots (Santoro et al. 2016, sec. 3.2).

    usage [B, N] -> [B, count, N], row h marking the (h+1)-th least-used slot. The sort is
    stable, so equal usages (fresh slots) resolve to the lowest index on every device.
    """
    order = torch.sort(usage, dim=-1, stable=True).indices[:, :count]
    # scatter, not one_hot: one_hot checks its indices on the host, a sync a CUDA graph cannot hold
    return usage.new_zeros(usage.shape[0], count, usage.shape[-1]).scatter_(-1, order.unsqueeze(-1), 1.0)


def lrua_write_weighting(read_prev: torch.Tensor, least: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """w_w = sigmoid(alpha) w_r_{t-1} + (1 - sigmoid(alpha)) w_lu_{t-1} (Santoro et al. 2016, sec. 3.2).

    Each write head writes where its read head last read (to update a slot that matched the
    previous sample) or to its least-used slot (to store a new one). read_prev, least [B, R, N],
    alpha [B, R, 1] already squashed to (0, 1).
    """
    return torch.lerp(least, read_prev, alpha)


def lrua_write(memory: torch.Tensor, least: torch.Tensor, w: torch.Tensor, add: torch.Tensor) -> torch.Tensor:
    """Zero the least-used slots, then M <- M + sum_h w_w[h] a[h]^T (Santoro et al. 2016, sec. 3.2).

    memory [B, N, W], least and w [B, R, N], add [B, R, W] -> the new memory.
    """
    keep = 1 - least.sum(dim=1).clamp_max(1)
    return torch.baddbmm(memory * keep.unsqueeze(-1), w.transpose(1, 2), add)


def update_usage(usage: torch.Tensor, read: torch.Tensor, write: torch.Tensor, decay: float) -> torch.Tensor:
    """w_u <- gamma w_u + sum_h w_r[h] + sum_h w_w[h] (Santoro et al. 2016, sec. 3.2): usage [B, N], read/write [B, R, N]."""
    return usage * decay + read.sum(dim=1) + write.sum(dim=1)


# ------------------------------------------------------------------ feature-keyed memory


def keyed_weighting(
    keys: torch.Tensor,
    present: torch.Tensor,
    query: torch.Tensor,
    beta: torch.Tensor,
    null_score: torch.Tensor,
    row_offset: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """A soft nearest-neighbour read: softmax over the stored rows' -beta ||q - k_i||^2 - o_i and a "none" score.

    keys [B, N, D], present [B, N] bool (rows holding a labeled drawing), query [B, D],
    beta [B, 1] (> 0), null_score [B, 1], row_offset [B, N] or None (no offset) -> (w [B, N], w_null [B]). Rows
    not present get no weight; the "none" entry takes the mass that no stored drawing
    explains, so a query far from every row reads mostly nothing. With o_i = log n_c(i) (n_c:
    the drawings stored for row i's class) a class's mass is the mean of its rows' kernels, a
    Parzen estimate of its density, so a class does not pull harder for having been shown
    more often. With one row per class and beta = 1 the class masses are the prototypical
    network's softmax (Snell et al. 2017, eq. 2) with a novelty option.
    """
    distances = (keys - query.unsqueeze(1)).square().sum(-1)
    scores = -beta * distances if row_offset is None else -beta * distances - row_offset
    scores = scores.masked_fill(~present, float("-inf"))
    weights = torch.softmax(torch.cat([scores, null_score], dim=-1), dim=-1)
    return weights[:, :-1], weights[:, -1]
