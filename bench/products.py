"""The matrix products of one model step, timed alone: a reference beside ``bench.model``'s FLOP bound.

``bench.model``'s bound is the FLOPs of a session-step over the rate of one large ``torch.mm``
(256x1024 @ 1024x1024). A step's own products have other shapes: the conv encoder's
convolutions have 1 to 64 channels, the controller's GEMMs a few hundred columns, and the
libraries reach those shapes at lower rates than the bound's product. ``MatrixProducts``
records a one-row step's products as it runs (a ``TorchDispatchMode``, under
``torch.inference_mode``, where ``conv2d`` and ``linear`` reach it whole); ``products_runner``
times its dense ones at a batch on random operands: each GEMM as one ``torch.mm`` over the
batch's rows, each convolution the faster of its im2col GEMM and oneDNN's direct convolution
in its blocked layout. The memory's batched products (``bmm``, ``baddbmm``: 1-7% of a step's
FLOPs) are recorded but not timed: the served graphs fuse them into inductor's loops over the
sessions (``models.addressing.fused_products``), where a ``bmm`` of their shapes runs at a
tenth of a GEMM's rate.

What this measures is a reference, not a bound: a step that did nothing but these products,
each called the way timed here. A step can beat it: by fusing or splitting a product, or with
kernels faster than the libraries' for these shapes. Its rate set against the step's own says
how much of the step's time goes outside its products as the libraries run them.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch.nn.modules.utils import _pair
from torch.utils._python_dispatch import TorchDispatchMode

from models import NTM


@dataclass(frozen=True)
class Convolution:
    """One convolution of a step, for one image.

    image: its input [C, H, W]; weight: [C', C / groups, k, k]; stride and padding as the
    call gave them; pixels_out: the output's pixels a channel (H' x W').
    """

    image: tuple[int, ...]
    weight: tuple[int, ...]
    stride: tuple[int, ...]
    padding: tuple[int, ...] | str
    dilation: tuple[int, ...]
    groups: int
    pixels_out: int

    def gemm(self) -> tuple[int, int, int]:
        """Its im2col GEMM per image: [output pixels, taps x input channels] @ [that, output channels]."""
        return self.pixels_out, int(torch.Size(self.weight[1:]).numel()), self.weight[0]


def arguments(func: torch._ops.OpOverload, args: Sequence[Any], kwargs: dict[str, Any]) -> dict[str, Any]:
    """An operator call's arguments by their schema's names, the defaults it left out filled in."""
    values = {}
    for position, argument in enumerate(func._schema.arguments):
        if position < len(args):
            values[argument.name] = args[position]
        elif argument.name in kwargs:
            values[argument.name] = kwargs[argument.name]
        elif argument.has_default_value():
            values[argument.name] = argument.default_value
    return values


def convolution(out: torch.Tensor, call: dict[str, Any]) -> Convolution:
    """The ``Convolution`` of an ``aten.conv2d`` or ``aten.convolution`` call (``arguments``) and its output."""
    padding = call["padding"]
    return Convolution(
        image=tuple(call["input"].shape[1:]),
        weight=tuple(call["weight"].shape),
        stride=_pair(call["stride"]),
        padding=padding if isinstance(padding, str) else _pair(padding),
        dilation=_pair(call["dilation"]),
        groups=call["groups"],
        pixels_out=out[0, 0].numel(),
    )


class MatrixProducts(TorchDispatchMode):
    """Records the matrix products of the calls made under it: convolutions, GEMMs and batched products.

    A linear layer's and ``mm``'s or ``addmm``'s GEMM [M, K] @ [K, N] is its own; a batched
    product (``bmm``, ``baddbmm``) [c, n, k] @ [c, k, m] is kept batched. Recorded at one row,
    each scales with the batch as its images, its M or its c times the rows.
    """

    def __init__(self) -> None:
        super().__init__()
        self.convolutions: list[Convolution] = []
        self.gemms: list[tuple[int, int, int]] = []  # [M, K] @ [K, N], M per row
        self.batched: list[tuple[int, int, int, int]] = []  # per row: c, [n, k] @ [k, m]

    def __torch_dispatch__(
        self,
        func: torch._ops.OpOverload,
        types: Sequence[type],
        args: Sequence[Any] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        out = func(*args, **(kwargs or {}))
        name = func.overloadpacket.__name__
        if name in ("conv2d", "convolution"):
            self.convolutions.append(convolution(out, arguments(func, args, kwargs or {})))
        elif name == "linear":
            self.gemms.append((args[0].numel() // args[0].shape[-1], args[1].shape[1], args[1].shape[0]))
        elif name in ("mm", "addmm"):
            a, b = args[-2], args[-1]  # addmm's beta and alpha are keyword-only
            self.gemms.append((a.shape[0], a.shape[1], b.shape[1]))
        elif name in ("bmm", "baddbmm"):
            a, b = args[-2], args[-1]
            self.batched.append((a.shape[0], a.shape[1], a.shape[2], b.shape[2]))
        return out

    def dense_flops(self) -> int:
        """FLOPs of the convolutions and GEMMs at one row (a multiply-add is 2): what ``products_runner`` times."""
        return 2 * sum(m * k * n for m, k, n in [*(c.gemm() for c in self.convolutions), *self.gemms])

    def flops(self) -> int:
        """FLOPs of every recorded product at one row, the batched ones included."""
        return self.dense_flops() + 2 * sum(c * n * k * m for c, n, k, m in self.batched)


def matrix_products(model: NTM) -> MatrixProducts:
    """The matrix products of one step of ``model`` at one row (the encoder's plain convolutions at one image)."""
    size = model.config.image_size
    recorder = MatrixProducts()
    with torch.inference_mode(), recorder:
        model.step(model.initial_state(1), torch.rand(1, size, size), model.label_input(torch.full((1,), -1)))
    return recorder


def fastest(ways: list[Callable[[], object]], calls: int = 9) -> Callable[[], object]:
    """The way that ran fastest in its best of ``calls`` timed calls (after one to warm it up)."""

    def best(way: Callable[[], object]) -> float:
        way()
        times = []
        for _ in range(calls):
            start = time.perf_counter()
            way()
            times.append(time.perf_counter() - start)
        return min(times)

    return min(ways, key=best)


def convolution_ways(conv: Convolution, batch: int, gen: torch.Generator) -> list[Callable[[], object]]:
    """A convolution at ``batch`` images: its im2col GEMM, and (numeric padding) oneDNN's blocked direct convolution."""
    m, k, n = conv.gemm()
    patches, factor = torch.randn(m * batch, k, generator=gen), torch.randn(k, n, generator=gen)
    ways: list[Callable[[], object]] = [lambda: torch.mm(patches, factor)]
    if isinstance(conv.padding, tuple):
        images = torch.randn(batch, *conv.image, generator=gen).to_mkldnn()
        weight = torch.randn(*conv.weight, generator=gen).to_mkldnn()
        bias = torch.randn(conv.weight[0], generator=gen).to_mkldnn()
        args = (conv.padding, conv.stride, conv.dilation, conv.groups)
        blocked = torch._C._nn.mkldnn_reorder_conv2d_weight(weight, *args)  # as models.onednn.BlockedConvStack
        ways.append(lambda: torch.mkldnn_convolution(images, blocked, bias, *args))
    return ways


def products_runner(products: MatrixProducts, batch: int) -> Callable[[int], None]:
    """n calls of every recorded dense product at ``batch`` rows, one after another, on random operands.

    A convolution runs whichever of its ways (``convolution_ways``) was faster when the runner
    was made; the batched products are not timed (see the module docstring).
    """
    gen = torch.Generator().manual_seed(batch)
    calls = [fastest(convolution_ways(conv, batch, gen)) for conv in products.convolutions]
    for m, k, n in products.gemms:
        a, b = torch.randn(m * batch, k, generator=gen), torch.randn(k, n, generator=gen)
        calls.append(lambda a=a, b=b: torch.mm(a, b))

    def run(steps: int) -> None:
        for _ in range(steps):
            for call in calls:
                call()

    return run
