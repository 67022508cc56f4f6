"""A stack of stride-2 3x3 convolutions with ReLU, run by oneDNN in its blocked layout, for inference.

PyTorch's eager convolutions take and return plain (NCHW or NHWC) tensors, so oneDNN
reorders every layer's activations into its blocked layout (nChw16c on AVX-512) and back.
Kept blocked from the first convolution to the last, with the weights reordered once, the
convolutions run faster on this project's CPU at every batch of two images or more than
PyTorch's fastest eager layout (channels-last weights; measured interleaved, minimum of 20:
9.6 against 12.7 us an image at 256, 11.2 against 14.0 at 64, 24.7 against 28.3 at 8, 70
against 75 at 2), with the same features to within 1e-6. At one image a call the eager
path is faster (59 against 131 us), so ``ConvEncoder`` uses this one from two images up.

Inference only: blocked tensors have no autograd. The weights are copies, so the stack
records each parameter's version counter and is rebuilt when a parameter has changed (an
optimiser step updates it in place); it is never pickled or deep-copied with its module.
"""

from __future__ import annotations

import torch
from torch import nn

MIN_BATCH = 2  # below it, the eager convolution is faster (see the module docstring)


def available() -> bool:
    """oneDNN is built in and not switched off (``torch.backends.mkldnn.enabled``)."""
    return torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled


class BlockedConvStack:
    """Conv2d + ReLU layers of one ``nn.Sequential``, with their weights in oneDNN's layout."""

    def __init__(self, convs: list[nn.Conv2d]) -> None:
        self.convs = convs
        with torch.no_grad():
            self.weights = [
                torch._C._nn.mkldnn_reorder_conv2d_weight(
                    conv.weight.detach().contiguous().to_mkldnn(), conv.padding, conv.stride, conv.dilation, conv.groups
                )
                for conv in convs
            ]
            self.biases = [conv.bias.detach().to_mkldnn() for conv in convs]
        self.versions = self._versions()

    def _versions(self) -> list[int]:
        return [p._version for conv in self.convs for p in (conv.weight, conv.bias)]

    def is_current(self) -> bool:
        """True while every parameter holds the values the stack was built from."""
        return self._versions() == self.versions

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """images [B, 1, S, S] float32 on the CPU -> the last layer's activations, a plain NCHW tensor."""
        x = images.contiguous().to_mkldnn()
        for conv, weight, bias in zip(self.convs, self.weights, self.biases, strict=True):
            x = torch.relu_(
                torch.mkldnn_convolution(x, weight, bias, conv.padding, conv.stride, conv.dilation, conv.groups)
            )
        return x.to_dense()
