"""NTMState: the whole recurrent state of a batch of sessions, as plain tensors.

A session's state is data, not module attributes: the service keeps one per session,
stacks pending sessions into a batch, runs one model step and splits the batch back.
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass, fields

import numpy as np
import torch

STATE_MAGIC = b"NTMS"
STATE_FORMAT_VERSION = 1
_HEADER = struct.Struct("<4sHHIIII")  # magic, version, reserved, N, W, hidden, heads


class StateFormatError(ValueError):
    """Bytes that are not a state of the expected shape."""


@dataclass(frozen=True)
class NTMState:
    """State of B sessions, batch first, float32.

    Attributes:
        memory: [B, N, W] memory matrix M.
        read: [B, W'] the previous step's read vector (W' = 0 for the LSTM-only baseline).
        weights: [B, H, N] the previous head weightings; head 0 reads, head 1 writes.
        h: [B, hidden] controller LSTM output.
        c: [B, hidden] controller LSTM cell.
    """

    memory: torch.Tensor
    read: torch.Tensor
    weights: torch.Tensor
    h: torch.Tensor
    c: torch.Tensor

    @property
    def batch_size(self) -> int:
        return self.h.shape[0]

    def tensors(self) -> tuple[torch.Tensor, ...]:
        return tuple(getattr(self, f.name) for f in fields(self))

    def to(self, device: torch.device | str) -> NTMState:
        return NTMState(*(t.to(device) for t in self.tensors()))

    def detach(self) -> NTMState:
        return NTMState(*(t.detach() for t in self.tensors()))

    @staticmethod
    def stack(states: list[NTMState]) -> NTMState:
        """Concatenate states (each of any batch size) along the batch dimension."""
        if not states:
            raise ValueError("cannot stack an empty list of states")
        return NTMState(*(torch.cat(parts, dim=0) for parts in zip(*(s.tensors() for s in states), strict=True)))

    def split(self) -> list[NTMState]:
        """One state of batch size 1 per session, each owning its own storage."""
        return [NTMState(*(t[i : i + 1].clone() for t in self.tensors())) for i in range(self.batch_size)]

    def equal(self, other: NTMState) -> bool:
        """Bit-for-bit equality of every tensor."""
        return all(torch.equal(a, b) for a, b in zip(self.tensors(), other.tensors(), strict=True))

    def to_bytes(self) -> bytes:
        """Compact little-endian encoding of a batch-1 state: a 24-byte header + raw float32.

        For the default config (128 x 40 memory, hidden 200) that is 24 + 4 * 5,816 = 23,288
        bytes. Round-trips bit-identically through ``from_bytes``.
        """
        if self.batch_size != 1:
            raise ValueError(f"to_bytes encodes one session, got batch size {self.batch_size}")
        _, slots, width = self.memory.shape
        heads = self.weights.shape[1]
        header = _HEADER.pack(STATE_MAGIC, STATE_FORMAT_VERSION, 0, slots, width, self.h.shape[1], heads)
        body = b"".join(
            t.detach().to("cpu", torch.float32).contiguous().numpy().astype("<f4", copy=False).tobytes()
            for t in self.tensors()
        )
        return header + body

    @classmethod
    def from_bytes(cls, data: bytes | bytearray | memoryview, read_width: int | None = None) -> NTMState:
        """Decode ``to_bytes`` output; ``read_width`` defaults to the memory width."""
        if len(data) < _HEADER.size:
            raise StateFormatError("state bytes shorter than the header")
        magic, version, _, slots, width, hidden, heads = _HEADER.unpack_from(data)
        if magic != STATE_MAGIC or version != STATE_FORMAT_VERSION:
            raise StateFormatError(f"not an NTM state of format version {STATE_FORMAT_VERSION}")
        if read_width is None:
            read_width = width if heads else 0
        shapes = [(1, slots, width), (1, read_width), (1, heads, slots), (1, hidden), (1, hidden)]
        sizes = [math.prod(s) for s in shapes]  # Python ints: np.prod wraps around int64 on a hostile header
        expected = _HEADER.size + 4 * sum(sizes)
        if len(data) != expected:
            raise StateFormatError(f"state bytes have length {len(data)}, expected {expected}")
        flat = np.frombuffer(data, dtype="<f4", offset=_HEADER.size).astype(np.float32)
        tensors, start = [], 0
        for shape, size in zip(shapes, sizes, strict=True):
            tensors.append(torch.from_numpy(flat[start : start + size].reshape(shape).copy()))
            start += size
        return cls(*tensors)
