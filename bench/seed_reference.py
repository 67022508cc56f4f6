"""The seed's NTM, re-implemented faithfully as the baseline of the benchmarks (never used in ``models``).

What makes it the seed, and slow: an ``nn.LSTM`` called once per step on a length-1 sequence;
one ``nn.Linear`` per head parameter; the memory kept as a module attribute (so one model
object serves one batch of sessions at a time); cosine similarity through
``F.cosine_similarity`` with the seed's ``+ 1e-16``; the circular shift as a Python loop over
batch elements, each one ``F.conv1d``; sharpening as ``w ** gamma / (sum + 1e-16)``. The read
head reads before the write head writes. The encoder is the raw 784 pixels. Only the seed's
hard-coded 5 output classes are fixed: the output has ``num_ways`` logits.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

IMAGE_PIXELS = 28 * 28
MEMORY_SLOTS, MEMORY_WIDTH, HIDDEN = 128, 40, 200
MEMORY_INIT = 1e-6

LSTMState = tuple[torch.Tensor, torch.Tensor]
SeedState = tuple[torch.Tensor, LSTMState, list[torch.Tensor]]  # (read, (h, c), [w_read, w_write])


class Memory(nn.Module):
    """The N x W memory matrix of one batch of sessions, held as an attribute."""

    def __init__(self, slots: int = MEMORY_SLOTS, width: int = MEMORY_WIDTH) -> None:
        super().__init__()
        self.slots, self.width = slots, width
        self.memory = torch.empty(0)

    def reset(self, batch: int) -> None:
        """Fresh memory for ``batch`` sessions: every cell MEMORY_INIT."""
        self.memory = torch.full((batch, self.slots, self.width), MEMORY_INIT)

    def read(self, w: torch.Tensor) -> torch.Tensor:
        """r = w^T M: w [B, N] -> [B, W]."""
        return torch.matmul(w.unsqueeze(1), self.memory).squeeze(1)

    def write(self, w: torch.Tensor, e: torch.Tensor, a: torch.Tensor) -> None:
        """M <- M * (1 - w e^T) + w a^T."""
        erase = torch.matmul(w.unsqueeze(-1), e.unsqueeze(1))
        add = torch.matmul(w.unsqueeze(-1), a.unsqueeze(1))
        self.memory = self.memory * (1 - erase) + add

    def address(
        self, k: torch.Tensor, beta: torch.Tensor, g: torch.Tensor, s: torch.Tensor, gamma: torch.Tensor, w_prev
    ) -> torch.Tensor:
        """Content weighting, interpolation, shift (per-element loop) and sharpening."""
        similarity = F.cosine_similarity(self.memory + 1e-16, k.unsqueeze(1) + 1e-16, dim=-1)
        w_content = F.softmax(beta * similarity, dim=1)
        w_gated = g * w_content + (1 - g) * w_prev
        w_shifted = torch.zeros_like(w_gated)
        for b in range(w_gated.shape[0]):
            w_shifted[b] = _convolve(w_gated[b], s[b])
        w = w_shifted**gamma
        return w / (w.sum(dim=1, keepdim=True) + 1e-16)


def _convolve(w: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """The seed's circular convolution of one weighting [N] with a 3-tap shift [3]."""
    padded = torch.cat([w[-1:], w, w[:1]])
    return F.conv1d(padded.view(1, 1, -1), s.view(1, 1, -1)).view(-1)


class Head(nn.Module):
    """A read or write head: one ``nn.Linear`` per addressing (and, for writing, erase/add) parameter."""

    def __init__(self, memory: Memory, is_write: bool) -> None:
        super().__init__()
        self.memory, self.is_write = memory, is_write
        width = memory.width
        self.fc_k = nn.Linear(HIDDEN, width)
        self.fc_beta = nn.Linear(HIDDEN, 1)
        self.fc_g = nn.Linear(HIDDEN, 1)
        self.fc_s = nn.Linear(HIDDEN, 3)
        self.fc_gamma = nn.Linear(HIDDEN, 1)
        if is_write:
            self.fc_e = nn.Linear(HIDDEN, width)
            self.fc_a = nn.Linear(HIDDEN, width)

    def forward(self, h: torch.Tensor, w_prev: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor]:
        """Address the memory; a read head returns (read, w), a write head writes and returns (None, w)."""
        w = self.memory.address(
            self.fc_k(h),
            F.softplus(self.fc_beta(h)),
            torch.sigmoid(self.fc_g(h)),
            F.softmax(self.fc_s(h), dim=1),
            1 + F.softplus(self.fc_gamma(h)),
            w_prev,
        )
        if not self.is_write:
            return self.memory.read(w), w
        self.memory.write(w, torch.sigmoid(self.fc_e(h)), self.fc_a(h))
        return None, w


class LSTMController(nn.Module):
    """``nn.LSTM`` over [x, previous read], called once per step on a length-1 sequence."""

    def __init__(self, inputs: int) -> None:
        super().__init__()
        self.lstm = nn.LSTM(inputs, HIDDEN)
        self.h0 = nn.Parameter(torch.randn(1, 1, HIDDEN) * 0.05)
        self.c0 = nn.Parameter(torch.randn(1, 1, HIDDEN) * 0.05)

    def initial_state(self, batch: int) -> LSTMState:
        return self.h0.expand(1, batch, HIDDEN).contiguous(), self.c0.expand(1, batch, HIDDEN).contiguous()

    def forward(self, x: torch.Tensor, state: LSTMState) -> tuple[torch.Tensor, LSTMState]:
        out, state = self.lstm(x.unsqueeze(0), state)
        return out.squeeze(0), state


class SeedNTM(nn.Module):
    """The seed's NTM: flatten encoder, one read head then one write head, logits over ``num_ways``."""

    def __init__(self, num_ways: int = 5) -> None:
        super().__init__()
        self.num_ways = num_ways
        self.memory = Memory()
        self.controller = LSTMController(IMAGE_PIXELS + num_ways + MEMORY_WIDTH)
        self.read_head = Head(self.memory, is_write=False)
        self.write_head = Head(self.memory, is_write=True)
        self.read0 = nn.Parameter(torch.randn(1, MEMORY_WIDTH) * 0.01)
        self.output = nn.Linear(HIDDEN + MEMORY_WIDTH, num_ways)

    def initial_state(self, batch: int) -> SeedState:
        """Reset the memory for ``batch`` sessions and return their start state."""
        self.memory.reset(batch)
        weights = [torch.zeros(batch, MEMORY_SLOTS), torch.zeros(batch, MEMORY_SLOTS)]
        return self.read0.expand(batch, -1).contiguous(), self.controller.initial_state(batch), weights

    def step(self, x: torch.Tensor, state: SeedState) -> tuple[torch.Tensor, SeedState]:
        """x [B, 784 + num_ways] (pixels and offset label) -> (logits [B, num_ways], new state)."""
        read, lstm_state, (w_read, w_write) = state
        h, lstm_state = self.controller(torch.cat([x, read], dim=1), lstm_state)
        read, w_read = self.read_head(h, w_read)
        _, w_write = self.write_head(h, w_write)
        assert read is not None
        return self.output(torch.cat([h, read], dim=1)), (read, lstm_state, [w_read, w_write])

    def forward(self, images: torch.Tensor, label_inputs: torch.Tensor) -> torch.Tensor:
        """Seed-style episode loop: images [T, B, 28, 28], label_inputs [T, B, K] -> logits [T, B, K]."""
        state = self.initial_state(images.shape[1])
        logits = []
        for t in range(images.shape[0]):
            out, state = self.step(torch.cat([images[t].flatten(1), label_inputs[t]], dim=1), state)
            logits.append(out)
        return torch.stack(logits)
