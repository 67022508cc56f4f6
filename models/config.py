"""NTMConfig: every architectural choice of a model, serialisable as JSON.

The config travels with the weights (``config.json`` beside ``model.safetensors``) and its
hash is part of the fingerprint that ties a session state to the weights it was made with.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from typing import Any, Literal

Encoder = Literal["flatten", "conv", "conv4"]
ENCODERS: tuple[str, ...] = ("flatten", "conv", "conv4")
Addressing = Literal["ntm", "lrua", "keyed", "prototype"]
ADDRESSINGS: tuple[str, ...] = ("ntm", "lrua", "keyed", "prototype")
KEYED_ADDRESSINGS: tuple[str, ...] = ("keyed", "prototype")  # rows of (feature key, label)


@dataclass(frozen=True)
class NTMConfig:
    """Architecture of an NTM few-shot classifier (Graves et al. 2014; Santoro et al. 2016).

    Attributes:
        num_ways: classes per episode; the output has one logit per slot.
        image_size: side of the square, preprocessed input image.
        encoder: ``flatten`` (the seed: raw pixels), ``conv`` (a small strided CNN) or ``conv4``
            (the few-shot standard: four conv-BatchNorm-ReLU-pool blocks; ``models.encoders``).
        conv_channels: output channels of each conv layer (``conv``: 3x3 stride 2; ``conv4``: each block).
        feature_size: width of the conv encoder's output features (``conv`` only).
        memory_slots: N, rows of the memory matrix.
        memory_width: W, width of each memory row (and of the read vector).
        hidden_size: the LSTM controller's hidden size.
        shift_range: largest circular shift of the location addressing (1: shifts -1, 0, +1).
        use_memory: False gives the LSTM-only baseline: the controller without memory.
        memory_init: the constant every memory cell starts at (cosine needs a non-zero norm).
        addressing: ``ntm`` (the seed: one read and one write head with content, gate, shift
            and sharpening; Graves et al. 2014) or ``lrua`` (least recently used access:
            ``read_heads`` content-addressed reads, each paired with a write to the slot it
            last read or to a least-used slot; Santoro et al. 2016, sec. 3.2) or ``keyed``
            (LRUA whose rows are (key of a drawing's features, its label): each step completes
            the previous drawing's row with its label, reads by a soft nearest neighbour over
            the stored keys with a learned "none" score, then writes its own key to the
            least-used slot; ``models.ntm``) or ``prototype`` (the same memory, read by class:
            a soft nearest neighbour over the mean key of each label's rows, the prototypical
            network's rule, Snell et al. 2017, with the learned "none" score). With both the
            first ``memory_width - num_ways`` columns of a row are the key, the rest the label.
        read_heads: number of read heads (``lrua`` only; ``ntm`` has exactly one).
        usage_decay: gamma of the usage update w_u <- gamma w_u + w_r + w_w (``lrua`` only).
    """

    num_ways: int = 5
    image_size: int = 28
    encoder: Encoder = "conv"
    conv_channels: tuple[int, ...] = (16, 32, 64)
    feature_size: int = 64
    memory_slots: int = 128
    memory_width: int = 40
    hidden_size: int = 200
    shift_range: int = 1
    use_memory: bool = True
    memory_init: float = 1e-6
    addressing: Addressing = "ntm"
    read_heads: int = 1
    usage_decay: float = 0.95

    def __post_init__(self) -> None:
        if self.encoder not in ENCODERS:
            raise ValueError(f"encoder must be one of {ENCODERS}, got {self.encoder!r}")
        for name in ("num_ways", "image_size", "memory_slots", "memory_width", "hidden_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.addressing not in ADDRESSINGS:
            raise ValueError(f"addressing must be one of {ADDRESSINGS}, got {self.addressing!r}")
        if self.read_heads < 1 or (self.addressing in ("ntm", *KEYED_ADDRESSINGS) and self.read_heads != 1):
            raise ValueError("read_heads must be >= 1, and exactly 1 with ntm or keyed addressing")
        if self.addressing in KEYED_ADDRESSINGS and self.memory_width <= self.num_ways:
            raise ValueError(f"{self.addressing} addressing needs memory_width > num_ways (a key, then the label)")
        if self.addressing == "lrua" and self.read_heads > self.memory_slots:
            raise ValueError("lrua needs read_heads <= memory_slots (one least-used slot per head)")
        if not 0.0 <= self.usage_decay <= 1.0:
            raise ValueError(f"usage_decay must be in [0, 1], got {self.usage_decay}")
        if self.num_ways < 2:
            raise ValueError(f"num_ways must be >= 2, got {self.num_ways}")
        if not 0 <= self.shift_range < self.memory_slots:
            raise ValueError("shift_range must be in [0, memory_slots)")
        if self.encoder == "conv" and (not self.conv_channels or self.feature_size < 1):
            raise ValueError("the conv encoder needs conv_channels and feature_size >= 1")
        object.__setattr__(self, "conv_channels", tuple(int(c) for c in self.conv_channels))

    @property
    def num_shifts(self) -> int:
        """Number of shift weights s: one per offset in [-shift_range, +shift_range]."""
        return 2 * self.shift_range + 1

    @property
    def keyed(self) -> bool:
        """True when the memory's rows are (feature key, label): ``keyed`` or ``prototype`` addressing."""
        return self.use_memory and self.addressing in KEYED_ADDRESSINGS

    @property
    def key_size(self) -> int:
        """Width of a row's key with ``keyed`` or ``prototype`` addressing: the memory width less the label columns."""
        return self.memory_width - self.num_ways

    @property
    def read_width(self) -> int:
        """Width of the read vectors, side by side, that the controller and output see (0 without memory)."""
        return self.memory_width * self.read_heads if self.use_memory else 0

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["conv_channels"] = list(self.conv_channels)
        return data

    def to_json(self) -> str:
        """Canonical JSON: sorted keys, so equal configs give equal text and hash."""
        return json.dumps(self.to_dict(), sort_keys=True, indent=2) + "\n"

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> NTMConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown config keys: {', '.join(unknown)}")
        values = dict(data)
        if "conv_channels" in values:
            values["conv_channels"] = tuple(values["conv_channels"])
        return cls(**values)

    @classmethod
    def from_json(cls, text: str) -> NTMConfig:
        data = json.loads(text)
        if not isinstance(data, dict):
            raise ValueError("config JSON must be an object")
        return cls.from_dict(data)

    def hash(self) -> str:
        """SHA-256 of the canonical JSON, hex, first 16 characters."""
        return hashlib.sha256(self.to_json().encode()).hexdigest()[:16]
