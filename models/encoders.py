"""Image encoders: what turns a preprocessed drawing [S, S] into the feature vector a step sees.

- ``flatten``: the seed's raw pixels.
- ``conv``: three stride-2 convolutions, a linear map and LayerNorm (the fast model).
- ``conv4``: the standard few-shot encoder of Vinyals et al. 2016 and Snell et al. 2017, four
  blocks of [3x3 conv, BatchNorm, ReLU, 2x2 max-pool]; 64 features at 28x28. For inference
  its BatchNorms are folded into the convolutions (``FoldedConvStack``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from models import onednn
from models.config import NTMConfig
from models.tracing import tracing


class ConvEncoder(nn.Module):
    """3x3 stride-2 convolutions with ReLU, then a linear map and LayerNorm to features.

    At 28x28 with channels (16, 32, 64) it costs about 1.2 MFLOP per image; the encoder runs
    once for all T steps of a sequence because it does not depend on the recurrence. Without
    autograd, on the CPU, batches of two images or more go through the convolutions in
    oneDNN's blocked layout (``models.onednn``: 1.3x faster, the same features to 1e-6).
    """

    def __init__(self, config: NTMConfig) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        channels, side = 1, config.image_size
        for out_channels in config.conv_channels:
            layers += [nn.Conv2d(channels, out_channels, 3, stride=2, padding=1), nn.ReLU(inplace=True)]
            channels, side = out_channels, (side + 1) // 2
        self.convs = nn.Sequential(*layers)
        self.project = nn.Linear(channels * side * side, config.feature_size)
        self.norm = nn.LayerNorm(config.feature_size)
        self._blocked: onednn.BlockedConvStack | None = None  # built on first use, see _convolve

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """images [B, S, S] in [0, 1] -> features [B, feature_size]."""
        return self.norm(self.project(self._convolve(images.unsqueeze(1)).flatten(1)))

    def _convolve(self, x: torch.Tensor) -> torch.Tensor:
        if tracing():
            convs = self._conv_layers()
            if convs[0].weight.requires_grad:  # a compiled training step: autograd's convolutions
                return self.convs(x)
            x = x.permute(0, 2, 3, 1)  # NHWC, a view: each layer's output comes channels-last
            for conv in convs:
                x = torch.relu(convolve_as_matmul(x, conv.weight, conv.bias, conv.stride[0], conv.padding[0]))
            return x.permute(0, 3, 1, 2)
        blockable = x.shape[0] >= onednn.MIN_BATCH and x.device.type == "cpu" and x.dtype == torch.float32
        if not blockable or torch.is_grad_enabled() or not onednn.available():
            return self.convs(x)
        if self._blocked is None or not self._blocked.is_current():
            self._blocked = onednn.BlockedConvStack(self._conv_layers())
        return self._blocked(x)

    def _conv_layers(self) -> list[nn.Conv2d]:
        return [m for m in self.convs if isinstance(m, nn.Conv2d)]

    def __getstate__(self) -> dict:
        """Pickling and deep copies leave the oneDNN weights behind (rebuilt on use)."""
        return {**super().__getstate__(), "_blocked": None}


def convolve_as_matmul(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, stride: int, padding: int
) -> torch.Tensor:
    """A square convolution of channels-last x [B, H, W, C] as one matrix product over its patches (im2col) -> [B, H', W', C'].

    Output pixel (i, j) is sum over (u, v, c) of x_pad[s*i + u, s*j + v, c] * w[c', c, u, v] + b[c']:
    the k*k strided slices of the padded input, stacked, are the patch matrix [B*H'*W', k*k*C],
    and the weight, as [k*k*C, C'], its right factor. For graphs that inductor compiles (the
    one-row packages, ``models.aot``): it generates the gather as one loop and the product as its
    C++ GEMM with the bias and the caller's ReLU fused, where ATen's convolution at one image is
    ``slow_conv2d`` (an unfold, then a GEMM call). The fast model's encoder at one image, a package
    each way, interleaved: 34 against 54 us, features the same to 6e-7.
    """
    k = weight.shape[-1]
    batch, height, width, channels = x.shape
    padded = F.pad(x, (0, 0, padding, padding, padding, padding))
    rows, cols = (height + 2 * padding - k) // stride + 1, (width + 2 * padding - k) // stride + 1
    taps = [
        padded[:, u : u + stride * (rows - 1) + 1 : stride, v : v + stride * (cols - 1) + 1 : stride, :]
        for u in range(k)
        for v in range(k)
    ]
    patches = torch.stack(taps, dim=3).reshape(batch * rows * cols, k * k * channels)
    factor = weight.permute(2, 3, 1, 0).reshape(k * k * channels, -1)
    out = patches @ factor if bias is None else torch.addmm(bias, patches, factor)
    return out.view(batch, rows, cols, -1)


class FlattenEncoder(nn.Module):
    """The seed's encoder: the raw pixels as a vector."""

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return images.flatten(1)


class Conv4Encoder(nn.Module):
    """Four [3x3 conv (padding 1), BatchNorm, ReLU, 2x2 max-pool] blocks, flattened (Snell et al. 2017, sec. 3.1).

    At 28x28 with 64 channels the output is 64 features (1x1 spatially) and a drawing costs
    about 19 MFLOP, 16 times the ``conv`` encoder. In eval mode without autograd the
    BatchNorms are folded into the convolutions' weights (w' = w * g / sqrt(v + eps),
    b' = (b - m) * g / sqrt(v + eps) + beta), which saves four passes over the activations.
    """

    def __init__(self, channels: tuple[int, ...] = (64, 64, 64, 64), image_size: int = 28) -> None:
        super().__init__()
        blocks: list[nn.Module] = []
        previous, side = 1, image_size
        for out_channels in channels:
            blocks.append(
                nn.Sequential(
                    nn.Conv2d(previous, out_channels, 3, padding=1),
                    nn.BatchNorm2d(out_channels),
                    nn.ReLU(inplace=True),
                    nn.MaxPool2d(2),
                )
            )
            previous, side = out_channels, side // 2
        if side < 1:
            raise ValueError(f"{len(channels)} pooling blocks need images of at least {2 ** len(channels)} pixels")
        self.blocks = nn.Sequential(*blocks)
        self.feature_size = previous * side * side
        self._folded: FoldedConvStack | None = None

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """images [B, S, S] in [0, 1] -> features [B, feature_size]."""
        x = images.unsqueeze(1)
        if x.device.type == "cpu":
            x = x.contiguous(memory_format=torch.channels_last)
        if self.training or torch.is_grad_enabled() or self._versionless() or tracing():
            return self.blocks(x).flatten(1)
        if self._folded is None or not self._folded.is_current():
            self._folded = FoldedConvStack(self.blocks)
        return self._folded(x).flatten(1)

    def _versionless(self) -> bool:
        """True when the weights were made under ``torch.inference_mode``: such tensors keep no
        version counter, so a folded copy could not tell that they changed; they run unfolded."""
        return self.blocks[0][0].weight.is_inference()

    def __getstate__(self) -> dict:
        """Pickling and deep copies leave the folded copy behind (rebuilt on use)."""
        return {**super().__getstate__(), "_folded": None}


class FoldedConvStack:
    """Inference copy of ``Conv4Encoder.blocks`` with each BatchNorm folded into its convolution.

    The copy records the version counters of the parameters and buffers it was made from and
    reports itself stale once any changed (an optimiser step or ``load_state_dict``). It is a
    plain object, not a submodule, so it never enters the encoder's ``state_dict``.
    """

    def __init__(self, blocks: nn.Sequential) -> None:
        self._sources = [t for block in blocks for t in (*block.parameters(), *block.buffers())]
        self._versions = self._current_versions()
        layers: list[nn.Module] = []
        for conv, norm, *rest in blocks:
            fused = fuse_conv_bn_eval(conv, norm)  # the encoder is in eval mode here, so are its blocks
            layers += [fused.to(memory_format=torch.channels_last), *rest]
        self.layers = nn.Sequential(*layers).eval()

    def _current_versions(self) -> list[int]:
        return [t._version for t in self._sources]

    def is_current(self) -> bool:
        return self._versions == self._current_versions()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


def make_encoder(config: NTMConfig) -> tuple[nn.Module, int]:
    """The configured image encoder and its feature width."""
    if config.encoder == "conv":
        return ConvEncoder(config), config.feature_size
    if config.encoder == "conv4":
        encoder = Conv4Encoder(config.conv_channels, config.image_size)
        return encoder, encoder.feature_size
    return FlattenEncoder(), config.image_size * config.image_size
