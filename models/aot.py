"""The whole step of one session on one image, compiled ahead of time by AOTInductor.

A lone client's step is the encoder and the input projection over one image
(``NTM.precompute_inputs``), then the recurrent step over one row (``NTM.recurrent_step``).
Through ``torch.compile`` each call pays Python's and dynamo's per-call costs (guards, the
AOT-autograd wrappers) on top of the kernels, and the encoder runs eagerly. AOTInductor
(``torch.export``, then ``torch._inductor.aoti_compile_and_package``) compiles both parts into
one package, a shared library whose call is a single C++ entry point. Measured side by side in
one process (``python -m bench.aoti_batch1``, ``bench/results/aoti-batch1-2026-12-06-served.json``),
us a step at batch 1: fast model eager 530, encoder eager then the compiled graph 441, this
package 220; default model 1,046, 780 and 418. Its outputs matched eager's to 5.7e-6 (fast)
and 9.5e-7 (default).

A package takes 7-13 s to build, so a server finds or builds it in a child process once its
graphs are warm (``start_build``, ``service.batching``), and keeps it in inductor's cache
folder (``TORCHINDUCTOR_CACHE_DIR``, under ``ntm-aot/``) for its next start. The file's name
is a digest of everything the package bakes in: the exported graph (so a change to the model's
code is a new package), the weights (frozen into the library as constants), how it was
exported and compiled (``RECIPE``), torch's version and the SIMD instruction set inductor
compiles for. A package is written under a temporary name and renamed into place, so replicas
sharing a cache volume never load half a file, and before use its answer to one step is
checked against eager's (``check``).
"""

from __future__ import annotations

import copy
import hashlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from models.checkpoint import load_checkpoint, save_checkpoint
from models.ntm import NTM
from models.state import NTMState

FOLDER_NAME = "ntm-aot"
# How a package is exported and compiled (see ``load_or_build``): part of its key, so a change to it is a new package.
RECIPE = "whole-step 2: grad mode on, weights frozen, freezing"
CHECK_TOLERANCE = 1e-4  # a package further than this from eager on its check step is not used

Package = Callable[..., tuple[torch.Tensor, ...]]


class WholeStep(nn.Module):
    """``NTM.step`` on flat tensors, as a module's forward for ``torch.export``."""

    def __init__(self, model: NTM) -> None:
        super().__init__()
        self.model = model

    def forward(
        self, images: torch.Tensor, label_inputs: torch.Tensor, *state: torch.Tensor
    ) -> tuple[torch.Tensor, ...]:
        """images [1, S, S], label_inputs [1, K], the state's tensors -> (logits, the new state's tensors)."""
        logits, new_state = self.model.step(NTMState(*state), images, label_inputs)
        return logits, *new_state.tensors()


def example_inputs(model: NTM) -> tuple[torch.Tensor, ...]:
    """One session's first step on a blank image without a label: the shapes a package is built for."""
    size = model.config.image_size
    images = torch.zeros(1, size, size, device=model.device)
    labels = model.label_input(torch.full((1,), -1, device=model.device))
    return (
        images,
        labels,
        *(t.detach().clone(memory_format=torch.contiguous_format) for t in model.initial_state(1).tensors()),
    )


def cache_folder() -> Path:
    """``ntm-aot/`` in inductor's cache folder (``TORCHINDUCTOR_CACHE_DIR`` when set)."""
    from torch._inductor.runtime.cache_dir_utils import cache_dir

    return Path(cache_dir()) / FOLDER_NAME


def package_key(exported: torch.export.ExportedProgram, model: NTM) -> str:
    """A digest of what a package of ``exported`` bakes in: graph, weights, recipe, torch's version, SIMD ISA.

    The graph alone is not enough: exported under ``torch.no_grad`` the same graph code
    compiled to a package twice as slow, so ``RECIPE`` names how packages are made.
    """
    from torch._inductor.cpu_vec_isa import pick_vec_isa

    digest = hashlib.sha256(RECIPE.encode())
    digest.update(exported.graph_module.code.encode())
    digest.update(str(exported.graph_signature).encode())
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    digest.update(f"{torch.__version__}|{pick_vec_isa()}".encode())
    return digest.hexdigest()[:32]


def export_step(model: NTM) -> torch.export.ExportedProgram:
    """``model``'s whole step at batch 1, exported (``torch.export``) from a copy of the model.

    The weights are frozen (``requires_grad`` off), but the export runs outside both
    ``torch.inference_mode`` and ``torch.no_grad``: a package exported inside either ran at
    half the speed (fast model, us a step: 154 against 82 under inference mode, 264 against
    143 under no_grad). Tracing mutates torch's
    process-wide state, which a model call or compile on another thread runs into (see
    ``start_build``): a server calls it only in a child process.
    """
    with torch.inference_mode(False):
        return torch.export.export(WholeStep(copy.deepcopy(model).requires_grad_(False)).eval(), example_inputs(model))


def package_path(exported: torch.export.ExportedProgram, model: NTM, folder: Path | None = None) -> Path:
    """Where the package of ``exported`` is kept: ``folder`` (default ``cache_folder()``), named by its key."""
    return (folder or cache_folder()) / f"{package_key(exported, model)}.pt2"


def build(exported: torch.export.ExportedProgram, path: Path) -> None:
    """Compile ``exported`` into a package at ``path``: written under a temporary name, then renamed into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, partial = tempfile.mkstemp(dir=path.parent, prefix="partial-", suffix=".pt2")
    os.close(handle)
    try:
        torch._inductor.aoti_compile_and_package(exported, package_path=partial, inductor_configs={"freezing": True})
        os.replace(partial, path)
    finally:
        Path(partial).unlink(missing_ok=True)


def start_build(model: NTM, folder: Path | None = None) -> subprocess.Popen:
    """Find or build the package of ``model`` in ``folder`` (default ``cache_folder()``) in a child process.

    A child (``python -m models.aot``) at the lowest CPU priority, not a thread: exporting and
    compiling trace the model, and tracing changes state that every thread of a process
    shares. Tried on a thread of the server, an export made a compiled call on the model
    thread fail in ``torch.fx.traceback`` (``KeyError: 'custom'``), and made another model's
    ``torch.compile`` trace into the export's proxy code and fail. The compiler processes the child
    starts inherit its niceness, so a build takes only CPU that serving leaves. The model
    goes to the child as a checkpoint in a temporary folder, which the child removes. Its
    standard output's last line is ``built PATH`` or ``cached PATH``.
    """
    checkpoint = save_checkpoint(model, tempfile.mkdtemp(prefix="ntm-aot-model-"))
    return subprocess.Popen(
        [sys.executable, "-m", "models.aot", str(checkpoint), str(folder or cache_folder())],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def build_result(stdout: str) -> tuple[Path, bool]:
    """The package's path in a finished ``start_build`` child's output, and whether the child built it."""
    word, _, path = stdout.strip().splitlines()[-1].partition(" ")
    if word not in ("built", "cached") or not path:
        raise ValueError(f"unexpected output of the package build: {stdout[-200:]!r}")
    return Path(path), word == "built"


def load(path: Path, model: NTM) -> Package:
    """The package at ``path``, once it has answered one step as ``model`` does eagerly (``check``)."""
    package = torch._inductor.aoti_load_package(str(path))
    check(package, model)
    return package


def find_or_build(model: NTM, folder: Path | None = None) -> tuple[Path, bool]:
    """The path of ``model``'s package in ``folder``, built here when it is missing; and whether it was built."""
    exported = export_step(model)
    path = package_path(exported, model, folder)
    built = not path.exists()
    if built:
        build(exported, path)
    return path, built


def load_or_build(model: NTM, folder: Path | None = None) -> tuple[Package, bool]:
    """The package of ``model``'s whole step at batch 1, from ``folder`` or built into it here; and whether it was built."""
    path, built = find_or_build(model, folder)
    return load(path, model), built


def check(package: Package, model: NTM) -> None:
    """Raise ValueError unless ``package`` answers a step with an inked image and a label as eager does."""
    generator = torch.Generator().manual_seed(0)
    images, _, *state = example_inputs(model)
    images = torch.rand(images.shape, generator=generator).to(images.device)
    labels = model.label_input(torch.zeros(1, dtype=torch.long, device=images.device))
    with torch.inference_mode():
        want = WholeStep(model)(images, labels, *state)
        have = package(images, labels, *state)
    difference = max((a - b).abs().max().item() for a, b in zip(have, want, strict=True))
    if difference > CHECK_TOLERANCE:
        raise ValueError(f"the package differs from eager by {difference:.1e} (tolerance {CHECK_TOLERANCE:.0e})")


def main(argv: list[str] | None = None) -> int:
    """``python -m models.aot CHECKPOINT FOLDER``: the package of the checkpoint's step, found in or built into FOLDER.

    Prints ``built PATH`` or ``cached PATH``, and removes CHECKPOINT (a temporary copy, see
    ``start_build``) however it ends, a SIGTERM from a closing server included.
    """
    checkpoint, folder = argv if argv is not None else sys.argv[1:]
    os.nice(19)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))
    from models.inference import skip_isa_test_builds

    skip_isa_test_builds()
    try:
        path, built = find_or_build(load_checkpoint(checkpoint).eval(), Path(folder))
    finally:
        shutil.rmtree(checkpoint, ignore_errors=True)
    print("built" if built else "cached", path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
