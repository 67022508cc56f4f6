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

With ``addressing="keyed"`` a memory row is (key, label): the key q = P f of a drawing's
features, the label its one-hot slot. At step t, with the label of x_{t-1} now known:

a. complete the row x_{t-1} was written to (the previous write weighting w_w) with that
   label; after a step without a label, erase that row instead (M <- M (1 - w_w e^T) + w_w a^T
   with e = 1 - labeled, a = [0, onehot(y_{t-1})]), so only labeled drawings are recalled
3. from h_t: strength beta_t = softplus, a "none" score nu_t and alpha_t = sigmoid
4. read by a soft nearest neighbour (``addressing.keyed_weighting``): w_r = softmax over the
   labeled rows of -beta_t ||q_t - k_i||^2 - alpha_t log n_c(i) (n_c(i): the drawings stored
   of row i's class; alpha = 1 makes a class's mass the mean of its kernels), and nu_t;
   r_t = w_r^T M. The label columns of r_t are the mass on each slot, and w_none the mass
   nothing stored explains
5. write q_t into the least-used slot (LRUA: zero it, then add [q_t, 0]); update the usage
6. p = class masses + w_none on the next free slot; logits = log p + Linear([h_t, r_t])

With ``addressing="prototype"`` step 4 reads by class instead of by row: the prototype of
slot c is the mean key of its rows, P_c = sum_i M_label[i, c] k_i / n_c, and w_c = softmax
over the filled slots of -beta_t ||q_t - P_c||^2, with nu_t; r_t = [sum_c w_c P_c, w_c].
With beta = 1 this is the prototypical network's online rule (Snell et al. 2017, eq. 2) at
every instance, not only at the first: a class shown twice is one mean, not two kernels.
The row read weighting, which the usage counts, spreads w_c evenly over the class's rows.

So a read is what a prototype classifier computes, and the controller, which sees the label
inputs and past reads, sets how sharp it is and when a drawing counts as new.

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

from models import addressing
from models.config import NTMConfig
from models.encoders import make_encoder
from models.state import NTMState

NUM_HEADS = 2  # head 0 reads, head 1 writes
KEYED_ROWS = 3  # keyed addressing state: the read weighting, the write weighting, the usage
PROBABILITY_EPS = 1e-6  # keyed read-out: log(p + eps), so a slot with no mass stays finite
SOFTPLUS_ONE = math.log(math.e - 1)  # softplus(SOFTPLUS_ONE) = 1
MEAN_LOGIT = 3.0  # sigmoid(3) = 0.95: a class's mass starts as (nearly) the mean of its rows' kernels


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
        if config.keyed:
            # The key of a row is a projection of the features (identity at the start when the
            # widths agree); the head gives beta and the "none" score.
            self.key_proj = nn.Linear(feature_size, config.key_size)
            self.head_proj = nn.Linear(hidden, len(self._keyed_head_bias()))
        elif config.use_memory:
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
        if self.config.keyed:
            with torch.no_grad():
                if self.key_proj.in_features == self.key_proj.out_features:
                    self.key_proj.weight.copy_(torch.eye(self.config.key_size))
                else:
                    nn.init.xavier_uniform_(self.key_proj.weight)
                nn.init.zeros_(self.key_proj.bias)
                nn.init.zeros_(self.head_proj.weight)
                self.head_proj.bias.copy_(torch.tensor(self._keyed_head_bias()))
            nn.init.zeros_(self.output.weight)  # the read-out starts as the memory's own log p
            nn.init.zeros_(self.output.bias)
            return
        if self.config.use_memory:
            nn.init.xavier_uniform_(self.head_proj.weight, gain=1.4)
            nn.init.normal_(self.head_proj.bias, std=0.01)
        nn.init.xavier_uniform_(self.output.weight)
        nn.init.normal_(self.output.bias, std=0.01)

    def _keyed_head_bias(self) -> tuple[float, ...]:
        """The keyed head's outputs at the start: beta = 1, "none" score 0 and, reading by
        row (``keyed``), alpha ~ 1 so a class's mass is (nearly) the mean of its kernels."""
        if self.config.addressing == "prototype":
            return (SOFTPLUS_ONE, 0.0)
        return (SOFTPLUS_ONE, 0.0, MEAN_LOGIT)

    # ----------------------------------------------------------------------------- state

    @property
    def device(self) -> torch.device:
        return self.output.weight.device

    def initial_state(self, batch_size: int) -> NTMState:
        """The learned start state of ``batch_size`` fresh sessions."""
        cfg, dev = self.config, self.device
        h = self.h0.expand(batch_size, -1)
        c = self.c0.expand(batch_size, -1)
        if cfg.keyed:  # nothing stored, nothing read
            memory = torch.zeros(batch_size, cfg.memory_slots, cfg.memory_width, device=dev)
            weights = torch.zeros(batch_size, KEYED_ROWS, cfg.memory_slots, device=dev)
            read = torch.zeros(batch_size, cfg.read_width, device=dev)
        elif cfg.use_memory:
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
        With ``keyed`` addressing the row is [pre-activations, key q = P f, label input]: the
        recurrent step needs the key and the label too, and neither depends on the recurrence.
        """
        lead = images.shape[:-2]
        features = self.encoder(images.reshape(-1, *images.shape[-2:]))
        labels = label_inputs.reshape(-1, label_inputs.shape[-1])
        pre = self.input_proj(torch.cat([features, labels], dim=-1))
        if self.config.keyed:
            pre = torch.cat([pre, self.key_proj(features), labels], dim=-1)
        return pre.reshape(*lead, -1)

    def recurrent_step(self, pre: torch.Tensor, state: NTMState) -> tuple[torch.Tensor, NTMState]:
        """Controller, heads, read, write and output for one step; pre [B, 4*hidden] from ``precompute_inputs``.

        ``step`` is ``precompute_inputs`` then this; a caller that knows several steps' inputs
        ahead (the service's batch form) runs the encoder once over all of them and then only this.

        Written for few autograd nodes per step (each costs more than its arithmetic at these
        sizes): one ``addmm`` for the recurrent projection, ``split`` instead of slicing.
        """
        cfg = self.config
        keyed = cfg.keyed
        if keyed:
            pre, query, label = pre.split([4 * cfg.hidden_size, cfg.key_size, cfg.num_ways], dim=-1)
        recurrent_in = torch.cat([state.h, state.read], dim=-1) if cfg.use_memory else state.h
        gates = torch.addmm(pre, recurrent_in, self.recurrent_proj.weight.t())
        in_gate, forget_gate, cell_gate, out_gate = gates.chunk(4, dim=-1)
        c = torch.addcmul(torch.sigmoid(forget_gate) * state.c, torch.sigmoid(in_gate), torch.tanh(cell_gate))
        h = torch.sigmoid(out_gate) * torch.tanh(c)
        if not cfg.use_memory:
            return self.output(h), NTMState(state.memory, state.read, state.weights, h, c)
        if keyed:
            memory, read, weights, probabilities = self._keyed_access(h, state, query, label)
            logits = torch.log(probabilities + PROBABILITY_EPS) + self.output(torch.cat([h, read], dim=-1))
            return logits, NTMState(memory, read, weights, h, c)
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

    def _keyed_access(
        self, h: torch.Tensor, state: NTMState, query: torch.Tensor, label: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Steps a, 3-5 of the module docstring's keyed memory -> (M_t, r_t, weightings, p [B, K]).

        The state's addressing rows are the previous read weighting, the previous write
        weighting (the row the previous drawing's key went to) and the usage.
        """
        cfg = self.config
        _, write_prev, usage = state.weights.unbind(1)
        labeled = label.sum(-1, keepdim=True)  # 1 when step t-1 carried a label, else 0
        unlabeled = 1 - labeled
        completion = torch.cat([torch.zeros_like(query), label], dim=-1)
        memory = addressing.write(state.memory, write_prev, unlabeled.expand(-1, cfg.memory_width), completion)
        usage = usage * (1 - unlabeled * write_prev)  # an erased row is free again
        keys, labels = memory.split([cfg.key_size, cfg.num_ways], dim=-1)
        heads = self.head_proj(h).split(1, dim=-1)
        beta, none_score = F.softplus(heads[0]), heads[1]
        counts = labels.sum(1)  # [B, K] drawings stored per slot
        if cfg.addressing == "prototype":
            prototypes = torch.bmm(labels.transpose(1, 2), keys) / counts.clamp_min(1).unsqueeze(-1)  # [B, K, D]
            class_weight, none_weight = addressing.keyed_weighting(prototypes, counts > 0.5, query, beta, none_score)
            read = torch.cat([torch.bmm(class_weight.unsqueeze(1), prototypes).squeeze(1), class_weight], dim=-1)
            read_weight = torch.bmm(labels, (class_weight / counts.clamp_min(1)).unsqueeze(-1)).squeeze(-1)
        else:
            class_size = torch.bmm(labels, counts.unsqueeze(-1)).squeeze(-1)  # [B, N] of each row's class (0: none)
            offset = torch.sigmoid(heads[2]) * torch.log(class_size.clamp_min(1))
            read_weight, none_weight = addressing.keyed_weighting(
                keys, class_size > 0.5, query, beta, none_score, offset
            )
            read = addressing.read(memory, read_weight)
        free_slot = (counts > 0.5).sum(-1)  # slots are taken in order: the count is the next free one
        table = torch.eye(cfg.num_ways + 1, cfg.num_ways, dtype=read.dtype, device=read.device)
        probabilities = read[:, cfg.key_size :] + none_weight.unsqueeze(-1) * table[free_slot]
        least = addressing.least_used(usage, 1)
        row = torch.cat([query, torch.zeros_like(label)], dim=-1).unsqueeze(1)
        memory = addressing.lrua_write(memory, least, least, row)
        usage = addressing.update_usage(usage, read_weight.unsqueeze(1), least, cfg.usage_decay)
        return memory, read, torch.stack([read_weight, least.squeeze(1), usage], dim=1), probabilities

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
