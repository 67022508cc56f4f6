"""The learning side: a batched Neural Turing Machine for few-shot classification.

This package never imports from ``service``; the service depends on it.
"""

from models.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from models.config import NTMConfig
from models.ntm import NTM
from models.state import NTMState, PackedState, StateLayout

__all__ = [
    "NTM",
    "CheckpointError",
    "NTMConfig",
    "NTMState",
    "PackedState",
    "StateLayout",
    "load_checkpoint",
    "save_checkpoint",
]
