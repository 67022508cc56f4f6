"""What a server runs of a model's recurrence: the step eager, or compiled for a ladder of batch sizes.

A server's model calls are ``NTM.precompute_inputs`` over the images of the steps that join
(the encoder and the input projections) and ``NTM.recurrent_step`` over one step of every
session under way. ``EagerRunner`` calls the step as it is. ``CompiledRunner`` runs it
through ``torch.compile`` (TorchInductor): the step's hundred small operators (the LSTM
cell, addressing, read and write) become a few fused C++ loops, called from a C++ wrapper
(``cpp_wrapper``, which saves the Python call per kernel: 121 against 155 us at batch 1 for
the fast model), with the weights frozen into constants (``freezing``).

The encoder stays eager, because compiling it does not pay on the CPU: oneDNN's blocked
convolutions (``models.onednn``) and the folded Conv-4 stack run it faster than inductor's
(the fast model's encoder and input projection, measured side by side: 1,756 against 2,195 us
at 256 images, 112 against 152 us at one), and eager is exact where inductor's convolutions
differ by up to 2e-5.

An inductor graph is specialised to its input shapes, and compiling one takes seconds, so
the batch sizes a server sees are rounded up to a ladder (1, 2, 4, ... up to the largest
batch): a call of ``b`` rows runs the graph of the next size up, on inputs padded by
repeating their last row, and the padding's outputs are dropped. Rows never mix (every
operator of a step is per session), so a padded call gives the unpadded call's rows.
``warm_up`` compiles every size before traffic; a size above the ladder runs eagerly. On
CUDA the graphs are captured as CUDA graphs (``mode="reduce-overhead"``), so a call is one
replay instead of hundreds of kernel launches, and the outputs are cloned out of the graphs'
static buffers before the next replay.

Inductor keeps what it compiled in an on-disk cache (``TORCHINDUCTOR_CACHE_DIR``), so a
second start with the same weights and versions loads the kernels instead of compiling them.
"""

from __future__ import annotations

import threading
import time

import torch

from models.ntm import NTM
from models.state import NTMState

_LIMIT_LOCK = threading.Lock()


def batch_ladder(largest: int) -> tuple[int, ...]:
    """1, 2, 4, ... and ``largest`` itself: the batch sizes a compiled runner has graphs for."""
    sizes, size = [], 1
    while size < largest:
        sizes.append(size)
        size *= 2
    return (*sizes, largest)


def rung(ladder: tuple[int, ...], rows: int) -> int | None:
    """The smallest ladder size that holds ``rows``; None above the ladder."""
    return next((size for size in ladder if size >= rows), None)


def pad_rows(tensor: torch.Tensor, rows: int) -> torch.Tensor:
    """``tensor`` with its last row repeated up to ``rows`` rows, as a contiguous inference tensor.

    A graph is compiled for contiguous inference tensors, and dynamo guards on both: the
    states of sessions that join a call are views into their packed vectors (strided by the
    whole state), and under ``torch.inference_mode`` a view of an ordinary tensor stays
    ordinary (a fresh session's LSTM state at batch 1 is a view of the learned h_0). Either
    would make dynamo compile the step again, so such a tensor is copied.
    """
    missing = rows - tensor.shape[0]
    if missing > 0:
        return torch.cat([tensor, tensor[-1:].expand(missing, *tensor.shape[1:])])
    if tensor.is_inference() and tensor.is_contiguous():
        return tensor
    return tensor.clone(memory_format=torch.contiguous_format)


class EagerRunner:
    """The model's own inference calls, unchanged."""

    kind = "eager"

    def __init__(self, model: NTM) -> None:
        self.model = model

    def recurrent_step(self, pre: torch.Tensor, state: NTMState) -> tuple[torch.Tensor, NTMState]:
        """pre [B, P], B sessions' state -> (logits [B, K], new state): see ``NTM.recurrent_step``."""
        return self.model.recurrent_step(pre, state)

    def warm_up(self) -> float:
        """Nothing to prepare; returns the seconds it took (0)."""
        return 0.0


class CompiledRunner(EagerRunner):
    """The recurrent step compiled by TorchInductor, one graph per ladder size (see the module docstring)."""

    kind = "compiled"

    def __init__(self, model: NTM, largest_batch: int) -> None:
        super().__init__(model)
        model.requires_grad_(False)  # served weights: inductor freezes them into the graphs as constants
        self.ladder = batch_ladder(largest_batch)
        self.cuda = model.device.type == "cuda"
        # One graph per ladder size and runner, all of one code object (``_recurrent_flat``): without room for
        # them, dynamo's limit on recompilations of a function (8) would cut the ladder short.
        with _LIMIT_LOCK:  # runners are made on their batchers' threads
            torch._dynamo.config.recompile_limit += len(self.ladder)
        self._step = torch.compile(
            self._recurrent_flat,
            dynamic=False,
            fullgraph=True,
            mode="reduce-overhead" if self.cuda else None,
            options=None if self.cuda else {"freezing": True, "cpp_wrapper": True},
        )

    def _recurrent_flat(self, pre: torch.Tensor, *state: torch.Tensor) -> tuple[torch.Tensor, ...]:
        logits, new_state = self.model.recurrent_step(pre, NTMState(*state))
        return logits, *new_state.tensors()

    def recurrent_step(self, pre: torch.Tensor, state: NTMState) -> tuple[torch.Tensor, NTMState]:
        """As ``EagerRunner.recurrent_step``, called under ``torch.inference_mode`` (as the batcher does)."""
        rows = pre.shape[0]
        size = rung(self.ladder, rows)
        if size is None:
            return self.model.recurrent_step(pre, state)
        if self.cuda:
            torch.compiler.cudagraph_mark_step_begin()
        logits, *tensors = self._step(*(pad_rows(t, size) for t in (pre, *state.tensors())))
        if self.cuda:  # a CUDA graph's outputs live in buffers that its next replay overwrites
            return logits[:rows].clone(), NTMState(*(t[:rows].clone() for t in tensors))
        return logits[:rows], NTMState(*(t[:rows] for t in tensors))

    @torch.inference_mode()
    def warm_up(self) -> float:
        """Compile (or load from inductor's cache) the step at every ladder size; returns the seconds taken."""
        started, model = time.perf_counter(), self.model
        size, device = model.config.image_size, model.device
        for rows in self.ladder:
            images = torch.zeros(rows, size, size, device=device)
            pre = model.precompute_inputs(images, model.label_input(torch.full((rows,), -1, device=device)))
            self.recurrent_step(pre, model.initial_state(rows))
        return time.perf_counter() - started
