"""The models a replica serves: each loaded checkpoint with its fingerprint and micro-batcher."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from models import NTM, PackedState, load_checkpoint
from models.checkpoint import resolve_device
from service.batching import MicroBatcher

if TYPE_CHECKING:
    from opentelemetry.trace import Tracer


@dataclass
class ServedModel:
    name: str
    path: Path
    model: NTM
    fingerprint: str
    batcher: MicroBatcher
    initial_state: PackedState
    default: bool

    @property
    def num_ways(self) -> int:
        return self.model.config.num_ways

    def describe(self) -> dict:
        cfg = self.model.config
        return {
            "name": self.name,
            "num_ways": cfg.num_ways,
            "image_size": cfg.image_size,
            "encoder": cfg.encoder,
            "memory": [cfg.memory_slots, cfg.memory_width] if cfg.use_memory else None,
            "addressing": cfg.addressing if cfg.use_memory else None,
            "read_heads": cfg.read_heads if cfg.use_memory else 0,
            "hidden_size": cfg.hidden_size,
            "fingerprint": self.fingerprint,
            "default": self.default,
        }


class ModelRegistry:
    """Loads every checkpoint directory once at start-up; the first is the default."""

    def __init__(self, models: dict[str, ServedModel]) -> None:
        self.models = models
        self.default = next(iter(models.values()))
        sizes = {served.model.config.image_size for served in models.values()}
        # The input side all served models share, or None when they differ (read on every step).
        self.image_size: int | None = sizes.pop() if len(sizes) == 1 else None

    @classmethod
    def load(
        cls,
        paths: list[Path],
        device: str,
        max_batch: int,
        max_wait: float,
        observer_for: Callable[[str], Callable[[int, float, float], None]] | None = None,
        nice: int = 0,
        tracer: Tracer | None = None,
        compile: bool = False,
        package: bool = False,
    ) -> ModelRegistry:
        if not paths:
            raise ValueError("no model to serve: give at least one checkpoint directory")
        target = resolve_device(device)
        models: dict[str, ServedModel] = {}
        for index, path in enumerate(paths):
            model = load_checkpoint(path, target)
            name = _model_name(Path(path), set(models))
            with torch.inference_mode():
                initial = model.initial_state(1).sessions()[0]
            observe = observer_for(name) if observer_for is not None else None
            batcher = MicroBatcher(model, max_batch, max_wait, observe, name, nice, tracer, compile, package)
            models[name] = ServedModel(name, Path(path), model, model.fingerprint(), batcher, initial, index == 0)
        return cls(models)

    def warming_up(self) -> list[str]:
        """The models whose batcher is still compiling its step (``MicroBatcher.ready`` not set)."""
        return [name for name, served in self.models.items() if not served.batcher.ready.is_set()]

    def get(self, name: str | None) -> ServedModel | None:
        return self.default if name is None else self.models.get(name)

    def close(self) -> None:
        for served in self.models.values():
            served.batcher.close()


def _model_name(path: Path, taken: set[str]) -> str:
    """The checkpoint directory's name ('pretrained' is served as 'default'), made unique."""
    base = "default" if path.resolve().name == "pretrained" else path.resolve().name
    name, n = base, 2
    while name in taken:
        name, n = f"{base}-{n}", n + 1
    return name
