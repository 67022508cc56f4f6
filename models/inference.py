"""What a server runs of a model's recurrence: the step eager, or compiled by TorchInductor.

A server's model calls are ``NTM.precompute_inputs`` over the images of the steps that join
(the encoder and the input projections) and ``NTM.recurrent_step`` over one step of every
session under way. ``EagerRunner`` calls the step as it is. ``CompiledRunner`` runs it
through ``torch.compile`` (TorchInductor): the step's hundred small operators (the LSTM
cell, addressing, read and write) become a few fused C++ loops, called from a C++ wrapper
(``cpp_wrapper``, which saves the Python call per kernel: 121 against 155 us at batch 1 for
the fast model). The weights stay inputs of the graphs: inductor's ``freezing`` (weights as
constants, GEMMs on prepacked weights) takes effect only when it is set in
``torch._inductor.config`` while dynamo traces, not as an option of ``torch.compile``, and set
that way it made the fast model's step no faster at 16 to 256 rows (one and two threads,
interleaved, fastest of 7: 593 and 3,360 against 525 and 3,306 us a call at 16 and 256 rows
on two threads), up to 9.5e-6 from eager where the plain graph stays within 1.9e-6, and its
warm-up 22.6 against 8.2 s (a trial on an AVX2 host).

The encoder stays eager, because compiling it does not pay on the CPU: oneDNN's blocked
convolutions (``models.onednn``) and the folded Conv-4 stack run it faster than inductor's
(the fast model's encoder and input projection, measured side by side: 1,756 against 2,195 us
at 256 images, 112 against 152 us at one), and eager is exact where inductor's convolutions
differ by up to 2e-5.

Compiling a graph takes seconds, and an inductor graph is specialised to its input shapes
unless a dimension is marked dynamic. On the CPU a runner has two graphs: one whose batch
dimension is symbolic (``torch._dynamo.mark_dynamic`` at warm-up), which takes every size
from 2 up without padding, and a static one for the largest batch, the size of every call of
a saturated server, where it is faster than the symbolic one. Everything
else stays static (``dynamic=False``): the graphs of every runner in a process belong to one
code object, so dynamo's automatic dynamic shapes would otherwise make the sizes of the second
model to compile (its hidden size, its memory's width) symbolic, which makes slower code. The fast
model's step, us a call, each way measured side by side in one process (``python -m
bench.compiled_shapes``, ``bench/results/compiled-shapes-2026-12-06.json``; "symbolic": the
symbolic graph alone; "ladder": static graphs for 1, 2, 4, ... 256, a call padded to the next
size up):

| rows | eager | served | symbolic | ladder |
|---:|---:|---:|---:|---:|
| 16 | 213 | 167 | 169 | 173 |
| 65 | 513 | 433 | 427 | 807 |
| 129 | 857 | 733 | 717 | 1,469 |
| 256 | 1,620 | 1,123 | 1,325 | 1,347 |

A padded call runs every row of the next size up, so just above a power of two a ladder is
slower than eager, and a ladder up to 256 is nine graphs a model to compile (87 s for both
shipped models with an empty cache, against 29 s for three graphs, one of them for one row).
A call above the largest batch runs eagerly.

One row goes through AOTInductor packages instead (``models.aot``), once ``load_packages`` or
``use_packages`` has given them to the runner, and eagerly until then: ``step`` with one
image (a lone session's step: the encoder, then the recurrence) is one call of the whole
step's package, and ``recurrent_step`` on one row (a session's batch form) one call of the
recurrent step's. A package's call skips dynamo's guards and wrappers and Python's
per-operator work in the encoder: the whole step took 0.26-0.48 of the time of the encoder
eager then a graph for one row (fast model: 82 against 321 us, default 357 against 749,
``bench/results/aoti-batch1-2026-12-06-conv-gemm.json``, on an Intel Xeon host where the
figures above came from an AMD EPYC one). A server builds them in the background once ready, so
its start compiles two graphs a model, not three (both shipped models, an empty cache: 28.8
against 43.4 s, ``bench/results/startup-2026-12-06-{package,before-package}.json``).

On CUDA the graphs are captured as CUDA graphs (``mode="reduce-overhead"``), so a call is one
replay instead of hundreds of kernel launches. A CUDA graph is recorded per shape, so there a
call is padded to a ladder of sizes (1, 2, 4, ... up to the largest batch) by repeating its
last row, the padding's outputs are dropped (rows never mix: every operator of a step is per
session), and the outputs are cloned out of the graphs' static buffers before the next replay.

Inductor keeps what it compiled in an on-disk cache (``TORCHINDUCTOR_CACHE_DIR``), so a
second start with the same weights and versions loads the kernels instead of compiling them.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

import torch

from models import aot
from models.ntm import NTM
from models.state import NTMState

_LIMIT_LOCK = threading.Lock()
CPU_OPTIONS = {"cpp_wrapper": True}  # inductor's options for the CPU graphs (see the module docstring)


def batch_ladder(largest: int) -> tuple[int, ...]:
    """1, 2, 4, ... and ``largest`` itself: the batch sizes a runner on CUDA has graphs for."""
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


def skip_isa_test_builds() -> None:
    """Let inductor take the SIMD instruction sets the CPU reports without compiling a test program for each.

    On the CPU, inductor picks the widest instruction set (AVX-512, AVX2, ...) that both the
    CPU reports (``torch.cpu``'s cpuinfo) and the compiler can build, which it finds by
    compiling a test program per set: 13 s of a first compile here (the fast model's graph
    for one row, an empty cache: 22 against 8.7 s). ``cpp.vec_isa_ok`` skips only that
    second check, so it is set unless ``TORCHINDUCTOR_VEC_ISA_OK`` says otherwise: the
    compiler a server compiles with (g++ 12 here) builds every set there is a CPU for.
    """
    if os.environ.get("TORCHINDUCTOR_VEC_ISA_OK") is None:
        torch._inductor.config.cpp.vec_isa_ok = True


class EagerRunner:
    """The model's own inference calls, unchanged."""

    kind = "eager"

    def __init__(self, model: NTM) -> None:
        self.model = model

    def recurrent_step(self, pre: torch.Tensor, state: NTMState) -> tuple[torch.Tensor, NTMState]:
        """pre [B, P], B sessions' state -> (logits [B, K], new state): see ``NTM.recurrent_step``."""
        return self.model.recurrent_step(pre, state)

    def step(self, state: NTMState, images: torch.Tensor, label_inputs: torch.Tensor) -> tuple[torch.Tensor, NTMState]:
        """One whole step of B sessions (``NTM.step``): the encoder eager, the recurrence through this runner."""
        return self.recurrent_step(self.model.precompute_inputs(images, label_inputs), state)

    def warm_up(self) -> float:
        """Nothing to prepare; returns the seconds it took (0)."""
        return 0.0


class CompiledRunner(EagerRunner):
    """The recurrent step compiled by TorchInductor (see the module docstring for its graphs)."""

    kind = "compiled"

    def __init__(self, model: NTM, largest_batch: int) -> None:
        super().__init__(model)
        model.requires_grad_(False)  # served weights: graphs without autograd (see ``models.tracing``'s users)
        self.largest = largest_batch
        self.cuda = model.device.type == "cuda"
        self.ladder = batch_ladder(largest_batch) if self.cuda else ()
        # Dynamo keeps every graph of a code object in one cache, and recompiles a function at most 8 times:
        # make room for this runner's graphs (the ladder on CUDA; the dynamic one and the largest on the CPU).
        with _LIMIT_LOCK:  # runners are made on their batchers' threads
            torch._dynamo.config.recompile_limit += len(self.ladder) or 2
        if not self.cuda:
            skip_isa_test_builds()
        options = None if self.cuda else CPU_OPTIONS
        mode = "reduce-overhead" if self.cuda else None
        self._step = torch.compile(self._recurrent_flat, dynamic=False, fullgraph=True, mode=mode, options=options)
        self._full = (
            None if self.cuda else torch.compile(self._recurrent_full, dynamic=False, fullgraph=True, options=options)
        )
        self.packages: dict[str, aot.Package] = {}  # by ``aot.PARTS`` name, once ``load_packages`` has them
        # Told once, with the error, when a package raises in service and the runner drops them all.
        self.on_package_failure: Callable[[Exception], None] | None = None

    def load_packages(self, folder: Path | None = None) -> bool:
        """Load, or build here, the one-row packages (``models.aot``); True when one was built.

        From then on one-row calls run through them. A build traces the model, so a server
        builds in a child process instead (``aot.PackageBuild``) and then calls ``use_packages``.
        """
        if self.cuda:
            raise ValueError("the one-row packages are for the CPU; CUDA replays CUDA graphs")
        self.packages, built = aot.load_or_build(self.model, folder)
        return built

    def use_packages(self, paths: dict[str, Path]) -> None:
        """Serve one-row calls through the packages at ``paths``, once each has passed ``aot.check``."""
        self.packages = aot.load(paths, self.model)

    def step(self, state: NTMState, images: torch.Tensor, label_inputs: torch.Tensor) -> tuple[torch.Tensor, NTMState]:
        """As ``EagerRunner.step``; a one-image call as one call of the whole step's package, once loaded."""
        if images.shape[0] == 1 and (answer := self._packaged("step", images, label_inputs, *state.tensors())):
            return answer
        return super().step(state, images, label_inputs)

    def _packaged(self, part: str, *inputs: torch.Tensor) -> tuple[torch.Tensor, NTMState] | None:
        """The ``part`` package's call on one row (contiguous inputs, as it was built for): (logits, new state).

        None when that package is not loaded. A package that raises (it passed ``aot.check`` when loaded, so this is a fault of the
        library or the machine) costs no request: the runner drops every package, says so once
        through ``on_package_failure``, and returns None, so that the caller runs the row
        eagerly. A package only reads its inputs, so the eager call starts from the same state.
        """
        package = self.packages.get(part)
        if package is None:
            return None
        try:
            # Contiguity is all a package needs: no dynamo guard here, so no copy of a view or of a plain tensor.
            logits, *tensors = package(*(t.contiguous() for t in inputs))
        except Exception as exc:
            self.packages = {}
            if self.on_package_failure is not None:
                self.on_package_failure(exc)
            return None
        return logits, NTMState(*tensors)

    def _recurrent_flat(self, pre: torch.Tensor, *state: torch.Tensor) -> tuple[torch.Tensor, ...]:
        logits, new_state = self.model.recurrent_step(pre, NTMState(*state))
        return logits, *new_state.tensors()

    def _recurrent_full(self, pre: torch.Tensor, *state: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """``_recurrent_flat`` under a code object of its own, so that its static graph has a cache of its own."""
        return self._recurrent_flat(pre, *state)

    def _graph(self, rows: int) -> Callable[..., tuple[torch.Tensor, ...]] | None:
        """The compiled graph for a call of ``rows`` rows on the CPU; None for one row and above the largest batch."""
        if rows == 1 or rows > self.largest:
            return None
        return self._full if rows == self.largest > 2 else self._step

    def recurrent_step(self, pre: torch.Tensor, state: NTMState) -> tuple[torch.Tensor, NTMState]:
        """As ``EagerRunner.recurrent_step``, called under ``torch.inference_mode`` (as the batcher does)."""
        rows = pre.shape[0]
        if self.cuda:
            return self._replay(pre, state)
        if rows == 1 and (answer := self._packaged("recurrent", pre, *state.tensors())):
            return answer
        graph = self._graph(rows)
        if graph is None:
            return self.model.recurrent_step(pre, state)
        logits, *tensors = graph(*(pad_rows(t, rows) for t in (pre, *state.tensors())))
        return logits, NTMState(*tensors)

    def _replay(self, pre: torch.Tensor, state: NTMState) -> tuple[torch.Tensor, NTMState]:
        """On CUDA: the CUDA graph of the next ladder size up, on padded rows, its outputs cloned out."""
        rows = pre.shape[0]
        size = rung(self.ladder, rows)
        if size is None:
            return self.model.recurrent_step(pre, state)
        torch.compiler.cudagraph_mark_step_begin()
        logits, *tensors = self._step(*(pad_rows(t, size) for t in (pre, *state.tensors())))
        # A CUDA graph's outputs live in buffers that its next replay overwrites.
        return logits[:rows].clone(), NTMState(*(t[:rows].clone() for t in tensors))

    def warm_sizes(self) -> tuple[int, ...]:
        """The batch sizes whose calls compile every graph: the ladder on CUDA; 2 and the largest on the CPU."""
        if self.cuda:
            return self.ladder
        return tuple(sorted({2, self.largest})) if self.largest >= 2 else ()

    @torch.inference_mode()
    def warm_up(self) -> float:
        """Compile (or load from inductor's cache) every graph the runner calls; returns the seconds taken."""
        started, model = time.perf_counter(), self.model
        size, device = model.config.image_size, model.device
        for rows in self.warm_sizes():
            images = torch.zeros(rows, size, size, device=device)
            pre = model.precompute_inputs(images, model.label_input(torch.full((rows,), -1, device=device)))
            inputs = [pad_rows(t, rows) for t in (pre, *model.initial_state(rows).tensors())]
            if rows == 2 and not self.cuda:  # the graph for every size from 2 up: its batch dimension symbolic
                for tensor in inputs:
                    torch._dynamo.mark_dynamic(tensor, 0)
            self.recurrent_step(inputs[0], NTMState(*inputs[1:]))
        return time.perf_counter() - started
