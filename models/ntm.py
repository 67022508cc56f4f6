"""The Neural Turing Machine few-shot classifier (Graves et al. 2014; Santoro et al. 2016).

One step, per session in a batch:

1. features f_t = encoder(x_t)                      (``flatten``: 784 pixels; ``conv``: a CNN)
2. LSTM controller over [f_t, onehot(y_{t-1}), r_{t-1}] -> h_t   (learned h_0, c_0)
3. one fused linear layer from h_t to both heads' parameters: key k, strength beta = softplus,
   gate g = sigmoid, shift s = softmax over offsets, gamma = 1 + softplus; the write head also
   gets erase e = sigmoid and add a
4. both heads address M_{t-1} (``models.addressing``); read r_t = w_r^T M_{t-1}
5. write M_t = M_{t-1} * (1 - w_w e^T) + w_w a^T
6. logits = Linear([h_t, r_t]) with one logit per slot; softmax only at the edge.

With ``addressing="lrua"`` steps 3-5 are Santoro et al.'s least recently used access
(sec. 3.2) instead: per head h a read key k, strength beta, gate alpha and add vector a;
zero the least-used slots of M_{t-1}, write a to w_w = sigmoid(alpha) w_r_{t-1} +
(1 - sigmoid(alpha)) w_lu_{t-1}, then read M_t by content (softmax(beta K(k, M_t))) and
update the usage. The add vector is separate from the key: at step t the controller knows
the label of x_{t-1} (label offset), so what it writes is about x_{t-1} while its key is
about x_t. Reading after the write finds x_{t-1} when x_t is of the same class.

Label input (Santoro et al. 2016, sec. 3): at step t the model sees image x_t together with
the one-hot slot of the label of step t-1 (all zeros at t = 0 and after a step that had no
label) and predicts the slot of x_t. So a label teaches the model one step later.

The module holds parameters only: the recurrent state travels as an ``NTMState`` in and out
of every call, so concurrent callers and interleaved episodes never share anything.
"""

from __future__ import annotations

import hashlib
import math

import torch
import torch.nn.functional as F
from torch import nn

from models import addressing, onednn
from models.config import NTMConfig
from models.state import NTMState

NUM_HEADS = 2  # head 0 reads, head 1 writes


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
        blockable = x.shape[0] >= onednn.MIN_BATCH and x.device.type == "cpu" and x.dtype == torch.float32
        if not blockable or torch.is_grad_enabled() or not onednn.available():
            return self.convs(x)
        if self._blocked is None or not self._blocked.is_current():
            self._blocked = onednn.BlockedConvStack([m for m in self.convs if isinstance(m, nn.Conv2d)])
        return self._blocked(x)

    def __getstate__(self) -> dict:
        """Pickling and deep copies leave the oneDNN weights behind (rebuilt on use)."""
        return {**super().__getstate__(), "_blocked": None}


class FlattenEncoder(nn.Module):
    """The seed's encoder: the raw pixels as a vector."""

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return images.flatten(1)


def make_encoder(config: NTMConfig) -> tuple[nn.Module, int]:
    """The configured image encoder and its feature width."""
    if config.encoder == "conv":
        return ConvEncoder(config), config.feature_size
    return FlattenEncoder(), config.image_size * config.image_size


class NTM(nn.Module):
    """Batched NTM whose state is data; see the module docstring for the equations."""

    def __init__(self, config: NTMConfig) -> None:
        super().__init__()
        self.config = config
        hidden, width, slots = config.hidden_size, config.memory_width, config.memory_slots
        self.encoder, feature_size = make_encoder(config)
        # Controller LSTM. Its input projection is split: the part over [features, label]
        # does not depend on the recurrence and is computed for all steps at once.
        self.input_proj = nn.Linear(feature_size + config.num_ways, 4 * hidden)
        self.recurrent_proj = nn.Linear(hidden + config.read_width, 4 * hidden, bias=False)
        self.h0 = nn.Parameter(torch.randn(hidden) * 0.05)
        self.c0 = nn.Parameter(torch.randn(hidden) * 0.05)
        if config.use_memory:
            if config.addressing == "ntm":
                # Per head: key (W), beta, gate, gamma, shift (2R+1); the write head adds e and a.
                self._head_size, heads = width + 3 + config.num_shifts, NUM_HEADS
                head_outputs = NUM_HEADS * self._head_size + 2 * width
            else:
                # Per LRUA head: read key (W), beta, alpha, add vector (W).
                self._head_size, heads = 2 * width + 2, config.read_heads
                head_outputs = heads * self._head_size
            self.head_proj = nn.Linear(hidden, head_outputs)
            self.weight0_logits = nn.Parameter(torch.randn(heads, slots) * 1e-5)
            self.read0 = nn.Parameter(torch.randn(config.read_width) * 0.01)
        self.output = nn.Linear(hidden + config.read_width, config.num_ways)
        self._reset_parameters(feature_size)

    def _reset_parameters(self, feature_size: int) -> None:
        hidden = self.config.hidden_size
        bound = 1 / math.sqrt(feature_size + self.config.read_width + hidden)
        for layer in (self.input_proj, self.recurrent_proj):
            nn.init.uniform_(layer.weight, -bound, bound)
        nn.init.zeros_(self.input_proj.bias)
        with torch.no_grad():  # forget-gate bias 1 (Jozefowicz et al. 2015)
            self.input_proj.bias[hidden : 2 * hidden] = 1.0
        if self.config.use_memory:
            nn.init.xavier_uniform_(self.head_proj.weight, gain=1.4)
            nn.init.normal_(self.head_proj.bias, std=0.01)
        nn.init.xavier_uniform_(self.output.weight)
        nn.init.normal_(self.output.bias, std=0.01)

    # ----------------------------------------------------------------------------- state

    @property
    def device(self) -> torch.device:
        return self.output.weight.device

    def initial_state(self, batch_size: int) -> NTMState:
        """The learned start state of ``batch_size`` fresh sessions."""
        cfg, dev = self.config, self.device
        h = self.h0.expand(batch_size, -1)
        c = self.c0.expand(batch_size, -1)
        if cfg.use_memory:
            memory = torch.full((batch_size, cfg.memory_slots, cfg.memory_width), cfg.memory_init, device=dev)
            weights = torch.softmax(self.weight0_logits, dim=-1)
            if cfg.addressing == "lrua":  # the read weightings, then the usage (all slots unused)
                weights = torch.cat([weights, weights.new_zeros(1, cfg.memory_slots)])
            weights = weights.expand(batch_size, -1, -1)
            read = self.read0.expand(batch_size, -1)
        else:
            memory = torch.zeros(batch_size, 0, 0, device=dev)
            weights = torch.zeros(batch_size, 0, 0, device=dev)
            read = torch.zeros(batch_size, 0, device=dev)
        return NTMState(memory, read.contiguous(), weights.contiguous(), h.contiguous(), c.contiguous())

    def fingerprint(self) -> str:
        """SHA-256 over the config and every parameter's bytes: which weights a state needs."""
        digest = hashlib.sha256(self.config.to_json().encode())
        for name, tensor in sorted(self.state_dict().items()):
            digest.update(name.encode())
            digest.update(tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
        return digest.hexdigest()[:16]

    # ----------------------------------------------------------------------------- steps

    def label_input(self, slots: torch.Tensor) -> torch.Tensor:
        """One-hot label inputs from slot indices; -1 (no label) gives all zeros. [...] -> [..., K].

        Rows of a [K + 1, K] table whose last row is zeros, which slot -1 indexes: one
        indexing op (``F.one_hot`` checks its input's range first, and then needs a mask).
        """
        k = self.config.num_ways
        table = torch.eye(k + 1, k, dtype=self.output.weight.dtype, device=self.output.weight.device)
        return table[slots.clamp_min(-1)]

    def precompute_inputs(self, images: torch.Tensor, label_inputs: torch.Tensor) -> torch.Tensor:
        """Everything of a step that does not depend on the recurrence, for any leading shape.

        images [..., S, S], label_inputs [..., K] -> controller pre-activations [..., 4*hidden].
        """
        lead = images.shape[:-2]
        features = self.encoder(images.reshape(-1, *images.shape[-2:]))
        pre = self.input_proj(torch.cat([features, label_inputs.reshape(-1, label_inputs.shape[-1])], dim=-1))
        return pre.reshape(*lead, -1)

    def recurrent_step(self, pre: torch.Tensor, state: NTMState) -> tuple[torch.Tensor, NTMState]:
        """Controller, heads, read, write and output for one step; pre [B, 4*hidden] from ``precompute_inputs``.

        ``step`` is ``precompute_inputs`` then this; a caller that knows several steps' inputs
        ahead (the service's batch form) runs the encoder once over all of them and then only this.

        Written for few autograd nodes per step (each costs more than its arithmetic at these
        sizes): one ``addmm`` for the recurrent projection, ``split`` instead of slicing.
        """
        cfg = self.config
        recurrent_in = torch.cat([state.h, state.read], dim=-1) if cfg.use_memory else state.h
        gates = torch.addmm(pre, recurrent_in, self.recurrent_proj.weight.t())
        in_gate, forget_gate, cell_gate, out_gate = gates.chunk(4, dim=-1)
        c = torch.addcmul(torch.sigmoid(forget_gate) * state.c, torch.sigmoid(in_gate), torch.tanh(cell_gate))
        h = torch.sigmoid(out_gate) * torch.tanh(c)
        if not cfg.use_memory:
            return self.output(h), NTMState(state.memory, state.read, state.weights, h, c)
        memory, read, weights = (self._ntm_access if cfg.addressing == "ntm" else self._lrua_access)(h, state)
        logits = self.output(torch.cat([h, read], dim=-1))
        return logits, NTMState(memory, read, weights, h, c)

    def _ntm_access(self, h: torch.Tensor, state: NTMState) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The seed's heads (Graves et al. 2014): read M_{t-1}, then write. -> (M_t, r_t, weightings)."""
        cfg = self.config
        width = cfg.memory_width
        heads, erase, add = self.head_proj(h).split([NUM_HEADS * self._head_size, width, width], dim=-1)
        key, beta, gate, gamma, shift = heads.view(h.shape[0], NUM_HEADS, self._head_size).split(
            [width, 1, 1, 1, cfg.num_shifts], dim=-1
        )
        weights = addressing.address(
            state.memory,
            state.weights,
            key,
            F.softplus(beta),
            torch.sigmoid(gate),
            torch.softmax(shift, dim=-1),
            1 + F.softplus(gamma),
        )
        read_weight, write_weight = weights.unbind(1)
        read = addressing.read(state.memory, read_weight)
        memory = addressing.write(state.memory, write_weight, torch.sigmoid(erase), add)
        return memory, read, weights

    def _lrua_access(self, h: torch.Tensor, state: NTMState) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Least recently used access (Santoro et al. 2016, sec. 3.2): write, then read M_t.

        The state's addressing rows are the R previous read weightings, then the usage vector.
        """
        cfg = self.config
        heads = cfg.read_heads
        key, beta, alpha, add = (
            self.head_proj(h)
            .view(h.shape[0], heads, self._head_size)
            .split([cfg.memory_width, 1, 1, cfg.memory_width], dim=-1)
        )
        read_prev, usage = state.weights.split([heads, 1], dim=1)
        usage = usage.squeeze(1)
        least = addressing.least_used(usage, heads)
        write_weight = addressing.lrua_write_weighting(read_prev, least, torch.sigmoid(alpha))
        memory = addressing.lrua_write(state.memory, least, write_weight, add)
        read_weight = addressing.content_weighting(memory, key, F.softplus(beta))
        read = torch.bmm(read_weight, memory).flatten(1)
        usage = addressing.update_usage(usage, read_weight, write_weight, cfg.usage_decay)
        return memory, read, torch.cat([read_weight, usage.unsqueeze(1)], dim=1)

    def step(self, state: NTMState, images: torch.Tensor, label_inputs: torch.Tensor) -> tuple[torch.Tensor, NTMState]:
        """One step of B sessions: images [B, S, S], label_inputs [B, K] -> (logits [B, K], new state).

        Pure: the module and the input state are left unchanged.
        """
        return self.recurrent_step(self.precompute_inputs(images, label_inputs), state)

    def forward_sequence(
        self, images: torch.Tensor, label_inputs: torch.Tensor, state: NTMState | None = None
    ) -> tuple[torch.Tensor, NTMState]:
        """T steps of B episodes: images [T, B, S, S], label_inputs [T, B, K] -> logits [T, B, K].

        Gives what T successive ``step`` calls give; the encoder and the controller's input
        projection run once over all T*B images.
        """
        if state is None:
            state = self.initial_state(images.shape[1])
        pre = self.precompute_inputs(images, label_inputs)
        logits = []
        for pre_t in pre.unbind(0):  # one UnbindBackward, not T full-size SelectBackward zeros
            out, state = self.recurrent_step(pre_t, state)
            logits.append(out)
        return torch.stack(logits), state

    def forward(self, images: torch.Tensor, label_inputs: torch.Tensor) -> torch.Tensor:
        """Training entry point: logits of whole episodes from the initial state."""
        return self.forward_sequence(images, label_inputs)[0]
