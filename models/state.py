"""NTMState: the whole recurrent state of a batch of sessions, as plain tensors.

A session's state is data, not module attributes: the service keeps one per session,
stacks pending sessions into a batch, runs one model step and splits the batch back.
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass, fields
from functools import cached_property

import numpy as np
import torch

STATE_MAGIC = b"NTMS"
STATE_FORMAT_VERSION = 2
_HEADER = struct.Struct("<4sHHIIII")  # magic, version, reads (format 2; reserved in 1), N, W, hidden, heads


def _format_1_reads(heads: int) -> int:
    """The read vectors a format-1 header implies: one whenever there is memory (addressing rows)."""
    return 1 if heads else 0


class StateFormatError(ValueError):
    """Bytes that are not a state of the expected shape."""


@dataclass(frozen=True)
class NTMState:
    """State of B sessions, batch first, float32.

    Attributes:
        memory: [B, N, W] memory matrix M.
        read: [B, W'] the previous step's read vector (W' = 0 for the LSTM-only baseline).
        weights: [B, H, N] the addressing state: with NTM heads the previous read (row 0) and
            write (row 1) weightings; with LRUA the R previous read weightings, then the usage.
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

    def select(self, indices: list[int]) -> NTMState:
        """The sessions at ``indices``, in that order, as a new state (a copy)."""
        index = torch.tensor(indices, device=self.h.device)
        return NTMState(*(t.index_select(0, index) for t in self.tensors()))

    def split(self) -> list[NTMState]:
        """One state of batch size 1 per session, each owning its own storage."""
        return [NTMState(*(t[i : i + 1].clone() for t in self.tensors())) for i in range(self.batch_size)]

    def equal(self, other: NTMState) -> bool:
        """Bit-for-bit equality of every tensor."""
        return all(torch.equal(a, b) for a, b in zip(self.tensors(), other.tensors(), strict=True))

    @property
    def layout(self) -> StateLayout:
        _, slots, width = self.memory.shape
        return StateLayout(slots, width, self.read.shape[1], self.weights.shape[1], self.h.shape[1])

    def pack(self) -> torch.Tensor:
        """All sessions' tensors side by side: [B, layout.size], in field order, one copy."""
        batch = self.batch_size
        return torch.cat([t.reshape(batch, -1) for t in self.tensors()], dim=1)

    @classmethod
    def unpack(cls, flat: torch.Tensor, layout: StateLayout) -> NTMState:
        """The inverse of ``pack``: views into ``flat`` [B, layout.size], no copy."""
        batch = flat.shape[0]
        parts = torch.split(flat, layout.sizes, dim=1)
        return cls(*(part.reshape(batch, *shape) for part, shape in zip(parts, layout.shapes, strict=True)))

    def sessions(self) -> list[PackedState]:
        """One ``PackedState`` per session, each owning its own storage (one copy per session)."""
        layout = self.layout
        return [PackedState(row.clone(), layout) for row in self.pack().to("cpu").unbind(0)]

    def to_bytes(self) -> bytes:
        """``PackedState.to_bytes`` of a batch-1 state."""
        if self.batch_size != 1:
            raise ValueError(f"to_bytes encodes one session, got batch size {self.batch_size}")
        return self.sessions()[0].to_bytes()

    @classmethod
    def from_bytes(cls, data: bytes | bytearray | memoryview) -> NTMState:
        """Decode ``to_bytes`` output (a batch-1 state)."""
        return PackedState.from_bytes(data).unpack()


@dataclass(frozen=True)
class StateLayout:
    """The per-session shapes of a state's tensors, in ``NTMState`` field order."""

    slots: int
    width: int
    read_width: int
    heads: int
    hidden: int

    @cached_property
    def shapes(self) -> tuple[tuple[int, ...], ...]:
        return ((self.slots, self.width), (self.read_width,), (self.heads, self.slots), (self.hidden,), (self.hidden,))

    @cached_property
    def sizes(self) -> list[int]:
        return [math.prod(shape) for shape in self.shapes]  # Python ints: no int64 wrap-around on a hostile header

    @cached_property
    def size(self) -> int:
        return sum(self.sizes)


@dataclass(frozen=True)
class PackedState:
    """One session's state as a single float32 vector [layout.size]: what the service stores.

    Stacking a batch of them is one ``torch.stack`` and splitting the result one ``clone`` per
    session, where ``NTMState`` needs one operation per tensor per session on both sides.
    """

    data: torch.Tensor
    layout: StateLayout

    @staticmethod
    def stack(states: list[PackedState], device: torch.device | str | None = None) -> NTMState:
        """A batch of sessions (all of one layout) as an ``NTMState`` of views into one new tensor on ``device``."""
        if not states:
            raise ValueError("cannot stack an empty list of states")
        layout = states[0].layout
        if any(s.layout != layout for s in states):
            raise ValueError("cannot stack states of different layouts")
        return NTMState.unpack(torch.stack([s.data.to(device) for s in states]), layout)

    def unpack(self) -> NTMState:
        """This session as an ``NTMState`` of batch size 1."""
        return NTMState.unpack(self.data.reshape(1, -1), self.layout)

    def equal(self, other: PackedState) -> bool:
        return self.layout == other.layout and torch.equal(self.data, other.data)

    def to_bytes(self) -> bytes:
        """Compact little-endian encoding: a 24-byte header + raw float32.

        The header holds the layout: N, W, hidden, the addressing rows and, from format 2, the
        number of read vectors. A layout that format 1 can say (one read vector with memory,
        none without: every NTM-heads model) is written as format 1, so that replicas of an
        older release still read these states during a rolling upgrade; LRUA's several read
        vectors need format 2. For the default config (128 x 40 memory, hidden 200) that is
        24 + 4 * 5,816 = 23,288 bytes. Round-trips bit-identically through ``from_bytes``.
        """
        lay = self.layout
        if lay.read_width == _format_1_reads(lay.heads) * lay.width:
            version, reads = 1, 0  # format 1: the field is reserved, written as 0
        else:
            version, reads = STATE_FORMAT_VERSION, lay.read_width // lay.width
            if reads * lay.width != lay.read_width:
                raise ValueError(f"read width {lay.read_width} is not a whole number of memory rows of {lay.width}")
        header = _HEADER.pack(STATE_MAGIC, version, reads, lay.slots, lay.width, lay.hidden, lay.heads)
        return (
            header
            + self.data.detach().to("cpu", torch.float32).contiguous().numpy().astype("<f4", copy=False).tobytes()
        )

    @classmethod
    def from_bytes(cls, data: bytes | bytearray | memoryview) -> PackedState:
        """Decode ``to_bytes`` output, of format version 2 or 1."""
        if len(data) < _HEADER.size:
            raise StateFormatError("state bytes shorter than the header")
        magic, version, reads, slots, width, hidden, heads = _HEADER.unpack_from(data)
        if magic != STATE_MAGIC or version not in (1, STATE_FORMAT_VERSION):
            raise StateFormatError(f"not an NTM state of format version 1 or {STATE_FORMAT_VERSION}")
        if version == 1:
            reads = _format_1_reads(heads)
        layout = StateLayout(slots, width, reads * width, heads, hidden)
        expected = _HEADER.size + 4 * layout.size
        if len(data) != expected:
            raise StateFormatError(f"state bytes have length {len(data)}, expected {expected}")
        flat = np.frombuffer(data, dtype="<f4", offset=_HEADER.size).astype(np.float32)
        return cls(torch.from_numpy(flat), layout)
