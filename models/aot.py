"""One session's step on one image, compiled ahead of time by AOTInductor.

A lone client's step is the encoder and the input projection over one image
(``NTM.precompute_inputs``), then the recurrent step over one row (``NTM.recurrent_step``).
Through ``torch.compile`` each call pays Python's and dynamo's per-call costs (guards, the
AOT-autograd wrappers) on top of the kernels, and the encoder runs eagerly. AOTInductor
(``torch.export``, then ``torch._inductor.aoti_compile_and_package``) compiles both parts into
one package, a shared library whose call is a single C++ entry point. Measured side by side in
one process (``python -m bench.aoti_batch1``, ``bench/results/aoti-batch1-2026-12-06-conv-gemm.json``),
us a step at batch 1: fast model eager 373, encoder eager then a compiled graph for one row
321, this package 82; default model 969, 749 and 357. Its outputs matched eager's to 1.0e-5
(fast) and 1.4e-6 (default). A second package, of the recurrent step alone for one row, serves a session's batch
form (several images in one request, a row at a time).

A package takes 10-45 s to build, so a server finds or builds them in a child process once its
graphs are warm (``PackageBuild``, ``service.batching``), and keeps them in inductor's cache
folder (``TORCHINDUCTOR_CACHE_DIR``, under ``ntm-aot/``) for its next start. The file's name
is a digest of everything the package bakes in: the exported graph (so a change to the model's
code is a new package), the weights (frozen into the library as constants), how it was
exported and compiled (``RECIPE``), torch's version and the CPU it was compiled on (its
model and instruction-set flags, ``cpu_signature``). A package is written under a temporary name and renamed into place, so replicas
sharing a cache volume never load half a file, and before use its answer to one step is
checked against eager's (``check``).
"""

from __future__ import annotations

import copy
import hashlib
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import nn

from models.checkpoint import load_checkpoint, save_checkpoint
from models.ntm import NTM
from models.state import NTMState

FOLDER_NAME = "ntm-aot"
# How a package is exported and compiled (see ``export_part``): part of its key, so a change to it is a new package.
RECIPE = "whole-step 4: grad mode on, weights frozen, freezing, max-autotune CPP GEMMs, convolutions as GEMMs"
# Inductor's options for a package (see ``build``): weights frozen into constants, and each matrix
# product timed at build time as inductor's own C++ micro-kernel against ATen's (oneDNN/MKL) call.
INDUCTOR_CONFIGS = {"freezing": True, "max_autotune": True, "max_autotune_gemm_backends": "CPP,ATEN"}
CHECK_TOLERANCE = 1e-4  # a package further than this from eager on its check step is not used

Package = Callable[..., Sequence[torch.Tensor]]  # flat input tensors -> flat output tensors


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


class RecurrentStep(WholeStep):
    """``NTM.recurrent_step`` on flat tensors: what a session's batch form (several images) runs a row at a time."""

    def forward(self, pre: torch.Tensor, *state: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """pre [1, P], the state's tensors -> (logits, the new state's tensors)."""
        logits, new_state = self.model.recurrent_step(pre, NTMState(*state))
        return logits, *new_state.tensors()


PARTS: dict[str, type[WholeStep]] = {"step": WholeStep, "recurrent": RecurrentStep}


def example_inputs(model: NTM, part: str, seed: int | None = None) -> tuple[torch.Tensor, ...]:
    """A first step without a label, for ``part``: a blank image, or with ``seed`` a random one.

    Plain tensors (not inference tensors, no autograd history): the shapes a package is built for.
    """
    size, device = model.config.image_size, model.device
    images = torch.zeros(1, size, size, device=device)
    if seed is not None:
        images = torch.rand(images.shape, generator=torch.Generator().manual_seed(seed)).to(device)
    labels = model.label_input(torch.full((1,), -1, device=device))
    state = tuple(t.detach().clone(memory_format=torch.contiguous_format) for t in model.initial_state(1).tensors())
    if part == "step":
        return images, labels, *state
    with torch.no_grad():
        return model.precompute_inputs(images, labels), *state


def cache_folder() -> Path:
    """``ntm-aot/`` in inductor's cache folder (``TORCHINDUCTOR_CACHE_DIR`` when set)."""
    from torch._inductor.runtime.cache_dir_utils import cache_dir

    return Path(cache_dir()) / FOLDER_NAME


def package_key(exported: torch.export.ExportedProgram, model: NTM) -> str:
    """A digest of what a package of ``exported`` bakes in: graph, weights, recipe, torch's version and threads, the CPU.

    The graph alone is not enough: exported under ``torch.no_grad`` the same graph code
    compiled to a package twice as slow, so ``RECIPE`` names how packages are made. The thread
    count decides which loops inductor parallelises, and the CPU's flags the SIMD instruction
    set it picks.
    """
    digest = hashlib.sha256(RECIPE.encode())
    digest.update(exported.graph_module.code.encode())
    digest.update(str(exported.graph_signature).encode())
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    digest.update(f"{torch.__version__}|{torch.get_num_threads()}|{cpu_signature()}".encode())
    return digest.hexdigest()[:32]


def cpu_signature() -> str:
    """The CPU's model and instruction-set flags (``/proc/cpuinfo``; else ``platform``'s names).

    Inductor compiles for the host's CPU (``-march=native`` on x86), so a package may use
    instructions (AMX, AVX512-FP16, ...) another CPU of the same SIMD width lacks, and running
    it there would kill the process with SIGILL. With this in its key, a replica on another
    CPU model builds its own package even when it shares the cache folder.
    """
    try:
        info = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        info = []
    wanted = ("model name", "flags", "Features", "CPU part")
    fields = sorted({line.strip() for line in info if line.split(":")[0].strip() in wanted})
    return "|".join(fields) or f"{platform.machine()}|{platform.processor()}"


def export_part(model: NTM, part: str) -> torch.export.ExportedProgram:
    """``part`` of ``model``'s step (``PARTS``) at batch 1, exported (``torch.export``) from a copy of the model.

    The weights are frozen (``requires_grad`` off), but the export runs outside both
    ``torch.inference_mode`` and ``torch.no_grad``: a package exported inside either ran at
    half the speed (fast model, us a step: 154 against 82 under inference mode, 264 against
    143 under no_grad). Tracing changes state that every thread of a process shares, so a
    server exports only in a child process (see ``PackageBuild``).
    """
    with torch.inference_mode(False):
        module = PARTS[part](copy.deepcopy(model).requires_grad_(False)).eval()
        return torch.export.export(module, example_inputs(model, part))


def package_path(exported: torch.export.ExportedProgram, model: NTM, folder: Path | None = None) -> Path:
    """Where the package of ``exported`` is kept: ``folder`` (default ``cache_folder()``), named by its key."""
    return (folder or cache_folder()) / f"{package_key(exported, model)}.pt2"


def build(exported: torch.export.ExportedProgram, path: Path, configs: dict[str, object] = INDUCTOR_CONFIGS) -> None:
    """Compile ``exported`` into a package at ``path``: written under a temporary name, then renamed into place.

    ``configs``: inductor's options (a benchmark compares another recipe; a served package's key
    assumes ``INDUCTOR_CONFIGS``). The package is compiled for the caller's torch threads
    (``torch.get_num_threads``), which its key records.

    One row is a matrix-vector product per layer, where a library call's fixed cost is most of
    the time: with ``max_autotune`` inductor times its own C++ micro-kernel (``CppMicroGemm``)
    against ATen's call for each product and bakes in the faster one (2 us against 13 for one
    of the fast model's products). The convolutions are matrix products too
    (``models.encoders.convolve_as_matmul``). Compiled for two threads, the products' weights
    (1.2 MB a fast-model step) stream through both cores' caches: the whole-step package,
    interleaved in one process, took 84 us compiled for two threads against 102 for one
    (138 for one thread with ATen's convolutions). The autotuned products sum in another order
    than MKL's: on the shipped fast model a package's logits (of magnitude 15) differ from
    eager's by up to 1.7e-5 after one step, and its probabilities by 1.3e-5 after a 50-step
    episode (4.5e-6 with inductor's defaults). A build takes 10-45 s.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, partial = tempfile.mkstemp(dir=path.parent, prefix="partial-", suffix=".pt2")
    os.close(handle)
    try:
        with warnings.catch_warnings():
            # Inductor's C++ GEMM template reads a weight's storage through the deprecated TypedStorage.
            warnings.filterwarnings("ignore", message="TypedStorage is deprecated", category=UserWarning)
            torch._inductor.aoti_compile_and_package(exported, package_path=partial, inductor_configs=configs)
        os.replace(partial, path)
    finally:
        Path(partial).unlink(missing_ok=True)


class PackageBuild:
    """``model``'s packages, found in or built into ``folder`` (default ``cache_folder()``) by a child process.

    A child (``python -m models.aot``) at the lowest CPU priority, not a thread: exporting and
    compiling trace the model, and tracing changes state that every thread of a process
    shares. Tried on a thread of the server, an export made a compiled call on the model
    thread fail in ``torch.fx.traceback`` (``KeyError: 'custom'``), and made another model's
    ``torch.compile`` trace into the export's proxy code and fail. The compiler processes the
    child starts inherit its niceness, so a build takes only CPU that serving leaves. The model
    goes to the child as a checkpoint in a temporary folder, removed by ``wait`` however the
    child ended. The child's standard output ends with a line per part: ``PART built PATH`` or
    ``PART cached PATH``.
    """

    def __init__(self, model: NTM, folder: Path | None = None) -> None:
        self.checkpoint = save_checkpoint(model, tempfile.mkdtemp(prefix="ntm-aot-model-"))
        try:
            arguments = (str(self.checkpoint), str(folder or cache_folder()), str(torch.get_num_threads()))
            self.process = subprocess.Popen(
                [sys.executable, "-m", "models.aot", *arguments],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        except BaseException:
            shutil.rmtree(self.checkpoint, ignore_errors=True)
            raise

    def wait(self) -> dict[str, tuple[Path, bool]]:
        """Block until the child ends: each part's package path, and whether the child built it.

        Raises RuntimeError when the child failed or was stopped, ValueError on output it
        should not have given.
        """
        try:
            output, errors = self.process.communicate()
        finally:
            shutil.rmtree(self.checkpoint, ignore_errors=True)
        if self.process.returncode != 0:
            raise RuntimeError(f"the package build exited with {self.process.returncode}: {errors[-400:]}")
        found = {}
        for line in output.strip().splitlines()[-len(PARTS) :]:
            part, word, path = (line.split(" ", 2) + ["", ""])[:3]
            if part in PARTS and word in ("built", "cached") and path:
                found[part] = (Path(path), word == "built")
        if sorted(found) != sorted(PARTS):
            raise ValueError(f"unexpected output of the package build: {output[-300:]!r}")
        return found

    def cancel(self) -> None:
        """Stop the child if it still runs (it removes its partial package on SIGTERM); ``wait`` then raises."""
        if self.process.poll() is None:
            self.process.terminate()


def find_or_build(model: NTM, folder: Path | None = None) -> dict[str, tuple[Path, bool]]:
    """Each part's package path in ``folder``, built here when it is missing; and whether it was built."""
    found = {}
    for part in PARTS:
        exported = export_part(model, part)
        path = package_path(exported, model, folder)
        built = not path.exists()
        if built:
            build(exported, path)
        found[part] = (path, built)
    return found


def entry_point(path: Path) -> Package:
    """The package at ``path``, loaded, as a function of its flat input tensors to its flat output tensors.

    The loaded model's ``__call__`` parses its input and output tree specs from JSON, flattens
    the inputs and rebuilds the outputs at every call: 20 us of Python on a fast model step
    (1,000 calls of its whole-step package, nine times interleaved: medians 105 us through
    ``__call__`` against 85 through ``boxed_run``). A part's inputs and
    outputs are flat tensors already, so a step goes straight to the loader's ``boxed_run``
    (which takes its argument list over), and through ``__call__`` only where the loader has no
    such method.
    """
    compiled = torch._inductor.aoti_load_package(str(path))
    run = getattr(getattr(compiled, "loader", None), "boxed_run", None)
    if run is None:
        return compiled
    return lambda *inputs: run(list(inputs))


def load(paths: dict[str, Path], model: NTM) -> dict[str, Package]:
    """The packages at ``paths`` by part, once each has answered a step as ``model`` does eagerly (``check``)."""
    packages = {part: entry_point(path) for part, path in paths.items()}
    for part, package in packages.items():
        check(part, package, model)
    return packages


def load_or_build(model: NTM, folder: Path | None = None) -> tuple[dict[str, Package], bool]:
    """``model``'s packages by part, from ``folder`` or built into it here; and whether any was built."""
    found = find_or_build(model, folder)
    return load({part: path for part, (path, _) in found.items()}, model), any(b for _, b in found.values())


def check(part: str, package: Package, model: NTM) -> None:
    """Raise ValueError unless ``package`` answers a step with a random image and a label as eager does."""
    inputs = list(example_inputs(model, part, seed=0))
    if part == "step":
        inputs[1] = model.label_input(torch.zeros(1, dtype=torch.long, device=model.device))
    with torch.inference_mode():
        want = PARTS[part](model)(*inputs)
        have = package(*inputs)
    difference = max((a - b).abs().max().item() for a, b in zip(have, want, strict=True))
    if difference > CHECK_TOLERANCE:
        raise ValueError(f"the {part} package differs from eager by {difference:.1e} (tolerance {CHECK_TOLERANCE:.0e})")


def main(argv: list[str] | None = None) -> int:
    """``python -m models.aot CHECKPOINT FOLDER THREADS``: the checkpoint's packages for THREADS torch threads.

    They are found in or built into FOLDER; THREADS is the server's thread count (the packages
    a server loads are compiled for its threads, ``package_key``).

    Prints a line per part (``PART built PATH`` or ``PART cached PATH``). On SIGTERM (a closing
    server, ``PackageBuild.cancel``) it exits through ``build``'s cleanup of its partial file.
    """
    checkpoint, folder, threads = argv if argv is not None else sys.argv[1:]
    torch.set_num_threads(int(threads))
    os.nice(19)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))
    from models.inference import skip_isa_test_builds

    skip_isa_test_builds()
    found = find_or_build(load_checkpoint(checkpoint).eval(), Path(folder))
    for part, (path, built) in found.items():
        print(part, "built" if built else "cached", path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
