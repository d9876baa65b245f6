"""WavenetFullChannel: a WaveNet over all channels of a quantized MEG recording.

After van den Oord et al., "WaveNet: a generative model for raw audio" (2016): a stack of
dilated causal convolutions with gated activations ``tanh(f) * sigmoid(g)``, residual and
skip connections, and optional global (per-example, e.g. subject) and local (per-time-step
``(B, D, T)`` tensor) conditioning added inside every gate. "Full channel": every channel's
token gets its own learned embedding (:class:`ChannelwiseTokenEmbedding`), all channels
enter the stack together, and the output head predicts every channel's next token.

Generation streams (fast WaveNet generation, Paine et al., 2016): each dilated conv keeps a
ring buffer of its last ``dilation·(k-1)`` inputs, so a new step costs one column per layer
rather than a re-run of the receptive field. Without the cache each step re-runs the
receptive field window; both give the same tokens.

Linear forecast (``linear_order: p``, ``linear_fit: true``): a ridge VAR(p) fitted on the
training split's decoded tokens before the first step (``ephys_gpt/training/data_init.py``,
the fit the evals report as a baseline), held fixed and saved with the weights together with
the data's mu-law code, forecasts each next value; the log-probability of every token under
that Gaussian forecast (:meth:`WavenetFullChannel.linear_logprior`) is added to the logits.
The head's last layer starts at zero, so the untrained model is the VAR's forecast
distribution (docs/models.md).

Legend: B batch, C channels, T time, V vocabulary, E token embedding width, Rc residual,
Dc dilation (gate) and Sc skip channels, G global conditioning width, Dl local channels.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F
from einops import rearrange
from threadpoolctl import threadpool_limits
from torch import nn

from ephys_gpt.layers.attention import autocast_dtype
from ephys_gpt.layers.causal_conv import CausalConv1d, ConvState, PointwiseConv1d
from ephys_gpt.layers.embeddings import ChannelwiseTokenEmbedding, OptionalEmbedding
from ephys_gpt.layers.generation import check_token_context, generate_tokens
from ephys_gpt.models.capabilities import TokenGenerator
from ephys_gpt.models.gpt2meg import check_tokens
from ephys_gpt.models.linear_path import check_linear_config
from ephys_gpt.models.output import ModelOutput
from ephys_gpt.models.registry import register_model
from ephys_gpt.models.token_var import TokenVARForecast, TokenVARStream


@dataclass
class WavenetConfig:
    """WavenetFullChannel hyper-parameters."""

    num_channels: int = 272        # C
    vocab_size: int = 256          # V, mu-law levels
    embed_dim: int = 8             # E, learned token embedding width per channel
    residual_channels: int = 64    # Rc, width of the residual stream
    dilation_channels: int = 64    # Dc, width of each gated activation
    skip_channels: int = 128       # Sc, width of the skip sum and output head
    kernel_size: int = 2           # taps per dilated conv
    layers_per_block: int = 8      # dilations 1, 2, 4, ..., 2**(layers_per_block-1) ...
    n_blocks: int = 2              # ... repeated n_blocks times
    n_subjects: int = 0            # > 0: global conditioning on a subject id (forward(subject=))
    global_dim: int = 16           # G, subject embedding width
    local_channels: int = 0        # Dl > 0: local conditioning tensor (B, Dl, T) (local_cond=)
    linear_order: int = 0          # p > 0: add a fitted VAR(p)'s forecast, as log-probabilities
                                   # of the tokens, to the logits (0: none)
    linear_fit: bool = False       # true: that VAR(p) is a ridge fit on the training split, set
                                   # before the first step and held fixed (required with p > 0)
    linear_select: bool = False    # true: linear_order is the largest order; the fit
                                   # takes the p <= linear_order with the smallest
                                   # 1-step error on the validation split (as the
                                   # evals do), the lags above it zero

    def __post_init__(self):
        name = type(self).__name__
        for key in ("num_channels", "vocab_size", "embed_dim", "residual_channels",
                    "dilation_channels", "skip_channels", "kernel_size", "layers_per_block",
                    "n_blocks", "global_dim"):
            v = getattr(self, key)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name}: {key} must be a positive integer, got {v!r}")
        for key in ("n_subjects", "local_channels"):
            v = getattr(self, key)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"{name}: {key} must be an integer >= 0, got {v!r}")
        check_linear_config(name, self.linear_order, self.linear_fit, fit_required=True,
                            select=self.linear_select)

    @property
    def dilations(self) -> list[int]:
        return [2 ** i for _ in range(self.n_blocks) for i in range(self.layers_per_block)]


class GatedResidualLayer(nn.Module):
    """One WaveNet layer: dilated causal conv → (+ conditioning) → tanh·sigmoid gate →
    residual and skip outputs (one fused 1×1 conv producing both).

    ``forward(x (B, Rc, T), g (B, 2Dc, 1) | None, l (B, Dl, T) | None, state=None)``
    → ``(residual (B, Rc, T) or None for the last layer, skip (B, Sc, T))``.
    """

    def __init__(self, cfg: WavenetConfig, dilation: int, last: bool):
        super().__init__()
        Dc = cfg.dilation_channels
        self.conv = CausalConv1d(cfg.residual_channels, 2 * Dc, cfg.kernel_size, dilation)
        self.global_proj = (nn.Linear(cfg.global_dim, 2 * Dc, bias=False)
                            if cfg.n_subjects else None)
        self.local_proj = (PointwiseConv1d(cfg.local_channels, 2 * Dc, bias=False)
                           if cfg.local_channels else None)
        # the last layer's residual output would be unused (and never get a gradient)
        self.n_res = 0 if last else cfg.residual_channels
        self.res_skip = PointwiseConv1d(Dc, self.n_res + cfg.skip_channels)

    def forward(self, x: torch.Tensor, g: torch.Tensor | None, local: torch.Tensor | None,
                state: ConvState | None = None):
        z = self.conv(x, state)  # (B, 2Dc, T)
        if self.global_proj is not None:
            z = z + self.global_proj(g)[:, :, None]
        if self.local_proj is not None:
            z = z + self.local_proj(local)
        f, gate = z.chunk(2, dim=1)
        h = torch.tanh(f) * torch.sigmoid(gate)  # (B, Dc, T)
        out = self.res_skip(h)  # (B, Rc + Sc, T)
        if not self.n_res:
            return None, out
        return x + out[:, :self.n_res], out[:, self.n_res:]


class WavenetStream:
    """Fast WaveNet generation (Paine et al., 2016) as one fused step over all layers.

    Built from a model and its layers' inputs over a primed window (``inputs[i]``
    ``(B, Rc, T)``), it holds each dilated conv's last ``dilation·(k-1)`` inputs in one ring
    buffer ``(layers · slots, B, Rc)`` and computes a step with four kernels per layer instead
    of about fifteen: the past taps of every layer are known before the step, so their
    contribution is one batched matmul for all layers; each layer then needs one matmul for
    its newest input, the gate (``tanh(f)·sigmoid(g) = tanh(f)·(1 + tanh(g/2))/2``: one
    ``tanh`` and one ``addcmul``) and one matmul for the residual; the skip outputs of all
    layers are one matmul at the end, and every intermediate lives in a buffer allocated
    once. The residual biases are folded into the next layers'
    conv biases (the ring holds inputs minus the cumulated residual bias), and global
    conditioning into the biases too. Weights are cast once to the compute dtype (the
    autocast dtype when autocast is on). With ``linear_order`` the stream also keeps the last
    p decoded values (``tokens``: the primed window) for the VAR's forecast, whose token
    log-probabilities are added to the logits in float32. ``step(tokens (B, C), local (B, Dl)
    | None)`` → logits ``(B, C, V)``; it equals the model's forward on the whole sequence.

    On the CPU in float32 (``backend=None`` picks it there; ``"torch"`` or ``"numpy"`` forces
    one) the same step runs as NumPy calls on NumPy views of these very buffers and weights
    (:class:`_NumpyStep`, no copy): a step is ~60 operations on single rows, where the cost
    of each call, not the arithmetic, is the time, and a NumPy call costs about half a torch
    one here; NumPy's BLAS also reads the 2 MB output head ~3x faster for one row. Measured
    at the example config, one thread: a step alone 0.49 -> 0.23 ms, a generated step
    0.55-0.81 -> 0.38-0.46 ms (docs/models.md, "Generation speed"). Hold NumPy's BLAS to
    one thread while stepping (:meth:`WavenetFullChannel.generate` does).
    """

    def __init__(self, model: WavenetFullChannel, inputs: list[torch.Tensor],
                 g: torch.Tensor | None, tokens: torch.Tensor | None = None,
                 backend: str | None = None):
        if backend not in (None, "torch", "numpy"):
            raise ValueError(f"WavenetStream: backend must be None, 'torch' or 'numpy', got "
                             f"{backend!r}")
        cfg = model.config
        h0 = inputs[0]
        dev, B = h0.device, h0.shape[0]
        self.dtype = autocast_dtype(dev.type) or model.input_proj.weight.dtype
        dt = self.dtype
        layers = model.layers
        k, Rc, Dc = cfg.kernel_size, cfg.residual_channels, cfg.dilation_channels
        self.model, self.n_layers, self.B, self.C = model, len(layers), B, cfg.num_channels
        with torch.no_grad():
            W = [layer.conv.weight for layer in layers]  # (2Dc, Rc, k) each
            # cumulated residual bias entering each layer (subtracted from the stored inputs)
            cum, c = [], torch.zeros(Rc, device=dev)
            for layer in layers:
                cum.append(c)
                if layer.n_res:
                    c = c + layer.res_skip.bias[:Rc].float()
            self.cum = torch.stack(cum)  # (L, Rc)
            # gate: tanh(f)·sigmoid(g) = tanh(f)·(1 + tanh(g/2))/2, so one tanh over the
            # whole conv output with the g half scaled by 1/2, and the final 1/2 folded into
            # the weights that read the gate (residual and skip)
            half = torch.cat([torch.ones(Dc), torch.full((Dc,), 0.5)]).to(dev)
            bias = torch.stack([
                (layer.conv.bias.float() + (w.sum(-1).float() @ cl)) * half for layer, w, cl in
                zip(layers, W, cum)])  # (L, 2Dc)
            bias = bias[:, None].expand(-1, B, -1)
            if g is not None:
                bias = bias + torch.stack([layer.global_proj(g).float() * half
                                           for layer in layers])
            self.bias = bias.to(dt).contiguous()  # (L, B, 2Dc)
            self.w_cur = [(w[:, :, -1].t() * half).to(dt).contiguous() for w in W]  # (Rc, 2Dc)
            # past taps j = 0 .. k-2 at offsets d·(k-1-j), rows ordered (tap, channel)
            self.w_past = torch.stack([rearrange(w[:, :, :-1], "o c j -> (j c) o") * half
                                       for w in W]).to(dt).contiguous()  # (L, (k-1)·Rc, 2Dc)
            self.w_res = [(layer.res_skip.weight[:Rc, :, 0].t() * 0.5).to(dt).contiguous()
                          for layer in layers[:-1]]  # (Dc, Rc)
            self.w_skip = (torch.cat([layer.res_skip.weight[layer.n_res:, :, 0].t()
                                      for layer in layers]) * 0.5).to(dt).contiguous()
            self.b_skip = sum(layer.res_skip.bias[layer.n_res:] for layer in layers).to(dt)
            self.w_local = ((torch.cat([layer.local_proj.weight[:, :, 0] for layer in layers]
                                       ).t() * half.repeat(len(layers))).to(dt).contiguous()
                            if cfg.local_channels else None)  # (Dl, L·2Dc)
            self.w_in = model.input_proj.weight[:, :, 0].t().to(dt).contiguous()
            self.b_in = model.input_proj.bias.to(dt)
            head = [m for m in model.out if isinstance(m, nn.Conv1d)]
            self.w_out = [(m.weight[:, :, 0].t().to(dt).contiguous(), m.bias.to(dt))
                          for m in head]
            # Ring: layer i keeps its input of stream position s at row i·M + s mod m_i
            # (m_i = dilation·(k-1) slots, M the largest); the rows a step reads and writes
            # repeat with the period lcm(m_i), so they are tabled once here.
            mods = [d * (k - 1) for d in cfg.dilations]
            M = max(mods)
            self.period = math.lcm(*mods)
            s_ = torch.arange(self.period)[:, None, None]
            taps = torch.tensor(cfg.dilations)[:, None] * torch.arange(k - 1, 0, -1)  # (L, k-1)
            base = torch.arange(len(mods))[:, None] * M
            m_ = torch.tensor(mods)[:, None]
            self.read_rows = (base + (s_ - taps) % m_).flatten(1).to(dev)  # (period, L·(k-1))
            self.write_rows = (base[:, 0] + s_[:, :, 0] % m_[:, 0]).to(dev)  # (period, L)
            # a fresh slot holds the causal zero padding: true input 0, stored as -cum
            self.ring = (-self.cum)[:, None, None, :].expand(-1, M, B, -1).to(dt).reshape(
                -1, B, Rc).contiguous()
            T = h0.shape[-1]
            self.t = T
            for i, (x, m) in enumerate(zip(inputs, mods)):
                n = min(m, T)  # stream positions T-n .. T-1 live at slots (pos mod m)
                rows = i * M + torch.arange(T - n, T, device=dev) % m
                self.ring[rows] = (x[:, :, T - n:].float() - self.cum[i][None, :, None]
                                   ).permute(2, 0, 1).to(dt)
            self.offsets = model.embed.offsets[:, None]  # (C, 1): channel c's table rows
        # every intermediate of a step lives in a buffer allocated here; a step only writes
        L = self.n_layers
        self.H = torch.empty(L, B, Rc, device=dev, dtype=dt)      # layer inputs (minus cum)
        self.P = torch.empty(L, B, 2 * Dc, device=dev, dtype=dt)  # past taps + biases
        self.Z = torch.empty(L, B, 2 * Dc, device=dev, dtype=dt)  # conv outputs, then tanh
        self.A = torch.empty(B, L * Dc, device=dev, dtype=dt)     # 2 x gates, all layers
        A = self.A.view(B, L, Dc)
        self._layer_bufs = [
            (self.P[i], self.H[i], self.w_cur[i], self.Z[i], self.Z[i, :, :Dc],
             self.Z[i, :, Dc:], A[:, i], self.w_res[i] if i < L - 1 else None,
             self.H[i + 1] if i < L - 1 else None) for i in range(L)]
        self.k = k
        self.lin = None
        if cfg.linear_order:
            if tokens is None:
                raise ValueError("WavenetStream: a model with linear_order needs the primed "
                                 "tokens")
            self.lin = TokenVARStream(model, tokens)
        cpu32 = dev.type == "cpu" and dt == torch.float32
        if backend == "numpy" and not cpu32:
            raise ValueError(f"WavenetStream: the numpy backend runs float32 on the CPU, but "
                             f"this stream computes in {dt} on {dev}")
        self._numpy = _NumpyStep(self) if backend == "numpy" or (
            backend is None and cpu32) else None

    def step(self, tok: torch.Tensor, local: torch.Tensor | None = None) -> torch.Tensor:
        """Tokens ``(B, C)`` of the newest step (and its local conditioning ``(B, Dl)``) →
        logits ``(B, C, V)`` for the next one. Runs without autograd (generation)."""
        if self._numpy is not None:
            return self._numpy(tok, local)
        with torch.no_grad(), torch.autocast(tok.device.type, enabled=False):
            phase = self.t % self.period
            emb = F.embedding(tok + self.offsets[:, 0], self.model.embed.table.weight)
            torch.addmm(self.b_in, emb.reshape(self.B, -1).to(self.dtype), self.w_in,
                        out=self.H[0])
            past = self.ring.index_select(0, self.read_rows[phase])  # (L·(k-1), B, Rc)
            L = self.n_layers
            past = (past.view(L, self.B, -1) if self.k == 2 else
                    past.view(L, self.k - 1, self.B, -1).transpose(1, 2).reshape(L, self.B, -1))
            torch.baddbmm(self.bias, past, self.w_past, out=self.P)  # all layers' past taps
            if self.w_local is not None:
                self.P += (local.to(self.dtype) @ self.w_local).view(self.B, L, -1).transpose(0, 1)
            for p, h, w, z, tf, tg, a, w_res, h_next in self._layer_bufs:
                torch.addmm(p, h, w, out=z).tanh_()
                torch.addcmul(tf, tf, tg, out=a)  # 2 · tanh(f) · sigmoid(g)
                if w_res is not None:
                    torch.addmm(h, a, w_res, out=h_next)
            self.ring.index_copy_(0, self.write_rows[phase], self.H)
            self.t += 1
            out = torch.addmm(self.b_skip, self.A, self.w_skip)
            for w, b in self.w_out:
                out = torch.addmm(b, out.relu_(), w)
            out = out.view(self.B, self.C, -1)
            if self.lin is not None:
                out = out + self.lin.step(tok)
        return out


class _NumpyStep:
    """:meth:`WavenetStream.step` as NumPy calls on NumPy views of the stream's buffers and
    weights (CPU, float32; the views share memory with the tensors, so both backends see one
    state). Same operations in the same order as the torch step, with each ``addmm`` split
    into a matmul and an in-place add; logits agree with it to float rounding (tested)."""

    def __init__(self, s: WavenetStream):
        def v(t: torch.Tensor) -> np.ndarray:
            return t.detach().numpy()

        m, L = s.model, s.n_layers
        Dc = m.config.dilation_channels
        self.s = s
        self.H, self.P, self.A, self.ring = v(s.H), v(s.P), v(s.A), v(s.ring)
        self.bias, self.w_past = v(s.bias), v(s.w_past)
        self.read_rows, self.write_rows = v(s.read_rows), v(s.write_rows)
        self.past = np.empty((s.read_rows.shape[1], s.B, self.ring.shape[-1]), np.float32)
        self.table, self.offsets = v(m.embed.table.weight), v(s.offsets[:, 0])
        self.w_in, self.b_in = v(s.w_in), v(s.b_in)
        self.w_skip, self.b_skip = v(s.w_skip), v(s.b_skip)
        self.w_out = [(v(w), v(b)) for w, b in s.w_out]
        self.w_local = None if s.w_local is None else v(s.w_local)
        Z, A = v(s.Z), self.A.reshape(s.B, L, Dc)
        self.layers = [(self.P[i], self.H[i], v(s.w_cur[i]), Z[i], Z[i, :, :Dc], Z[i, :, Dc:],
                        A[:, i], v(s.w_res[i]) if i < L - 1 else None,
                        self.H[i + 1] if i < L - 1 else None) for i in range(L)]
        self.lin = None if s.lin is None else _NumpyVAR(s.lin)

    def __call__(self, tok: torch.Tensor, local: torch.Tensor | None) -> torch.Tensor:
        s, B, L = self.s, self.s.B, self.s.n_layers
        tk = tok.numpy()
        phase = s.t % s.period
        emb = self.table[tk + self.offsets]  # (B, C, E)
        np.matmul(emb.reshape(B, -1), self.w_in, out=self.H[0])
        self.H[0] += self.b_in
        np.take(self.ring, self.read_rows[phase], axis=0, out=self.past)
        past = (self.past.reshape(L, B, -1) if s.k == 2 else np.ascontiguousarray(
            self.past.reshape(L, s.k - 1, B, -1).transpose(0, 2, 1, 3)).reshape(L, B, -1))
        np.matmul(past, self.w_past, out=self.P)
        self.P += self.bias
        if self.w_local is not None:
            loc = local.detach().float().numpy() @ self.w_local  # (B, L·2Dc)
            self.P += loc.reshape(B, L, -1).transpose(1, 0, 2)
        for p, h, w, z, tf, tg, a, w_res, h_next in self.layers:
            np.matmul(h, w, out=z)
            z += p
            np.tanh(z, out=z)
            np.multiply(tf, tg, out=a)
            a += tf  # 2 · tanh(f) · sigmoid(g)
            if w_res is not None:
                np.matmul(a, w_res, out=h_next)
                h_next += h
        self.ring[self.write_rows[phase]] = self.H
        s.t += 1
        out = self.A @ self.w_skip
        out += self.b_skip
        for w, b in self.w_out:
            np.maximum(out, 0, out=out)
            out = out @ w
            out += b
        out = out.reshape(B, s.C, -1)
        if self.lin is not None:
            out += self.lin(tk)
        return torch.from_numpy(out)


class _NumpyVAR:
    """:meth:`TokenVARStream.step` as NumPy calls on views of its buffers (see
    :class:`_NumpyStep`), with :meth:`WavenetFullChannel.linear_logprior`'s lookup."""

    def __init__(self, lin: TokenVARStream):
        m = lin.model
        self.lin = lin
        self.values = m.token_values.flatten().numpy()
        self.offsets = m.token_offsets.numpy()
        self.buf, self.w, self.b = lin.buf.numpy(), lin.w.numpy(), m.var_intercept.numpy()
        C, G, V = m.logprior_table.shape
        self.table = m.logprior_table.numpy().reshape(C * G, V)
        self.origin, self.step = m.logprior_grid[:, 0].numpy(), m.logprior_grid[:, 1].numpy()
        self.base, self.G = np.arange(C) * G, G

    def __call__(self, tk: np.ndarray) -> np.ndarray:
        lin, p, i = self.lin, self.lin.p, self.lin.i
        v = self.values[tk + self.offsets]
        self.buf[:, i] = v
        self.buf[:, i + p] = v
        lin.i = i = (i + 1) % p
        pred = self.buf[:, i:i + p].reshape(v.shape[0], -1) @ self.w
        pred += self.b
        u = np.clip((pred - self.origin) / self.step, 0, self.G - 1.001)
        j = np.floor(u)
        rows = np.minimum(self.base + j.astype(np.int64), self.table.shape[0] - 2)
        lo = self.table[rows]
        lo += (u - j)[..., None] * (self.table[rows + 1] - lo)
        return lo


def _drop_token_log_width(state_dict, prefix, *args) -> None:
    """Weights saved before the exact log-prior held each token's log bin width
    (``token_log_width``); it is now derived from ``token_values``."""
    state_dict.pop(prefix + "token_log_width", None)


@register_model(
    "WavenetFullChannel",
    input_kind="tokens",
    causal=True,
    capabilities=(TokenGenerator,),
    tiny_config={"num_channels": 3, "vocab_size": 16, "embed_dim": 4, "residual_channels": 8,
                 "dilation_channels": 8, "skip_channels": 8, "layers_per_block": 3,
                 "n_blocks": 1},
    output_time_dim=-2,
    default_loss="CrossEntropy",
    config_class=WavenetConfig,
)
class WavenetFullChannel(TokenVARForecast, nn.Module):
    """WaveNet over all channels' tokens: ``(B, C, T)`` int64 → logits ``(B, C, T, V)``."""

    def __init__(self, **config):
        super().__init__()
        self.config = cfg = WavenetConfig(**config)
        self.embed = ChannelwiseTokenEmbedding(cfg.num_channels, cfg.vocab_size, cfg.embed_dim)
        self.input_proj = PointwiseConv1d(cfg.num_channels * cfg.embed_dim,
                                          cfg.residual_channels)
        self.subject_emb = OptionalEmbedding(cfg.n_subjects, cfg.global_dim, "subject")
        dil = cfg.dilations
        self.layers = nn.ModuleList(GatedResidualLayer(cfg, d, last=i == len(dil) - 1)
                                    for i, d in enumerate(dil))
        Sc = cfg.skip_channels
        self.out = nn.Sequential(nn.ReLU(), PointwiseConv1d(Sc, Sc), nn.ReLU(),
                                 PointwiseConv1d(Sc, cfg.num_channels * cfg.vocab_size))
        self.receptive_field = 1 + sum(layer.conv.context for layer in self.layers)
        if cfg.linear_order:  # the fitted VAR and the token codec (set_linear_path)
            # the head starts silent: the untrained model is the VAR's forecast distribution
            nn.init.zeros_(self.out[-1].weight)
            nn.init.zeros_(self.out[-1].bias)
            self._init_token_var()
            self._register_load_state_dict_pre_hook(_drop_token_log_width)

    def _check_local(self, local: torch.Tensor | None, B: int, T: int) -> None:
        Dl = self.config.local_channels
        if Dl == 0:
            if local is not None:
                raise ValueError("local_cond was given but the model was built with "
                                 "local_channels=0")
            return
        if local is None or local.dim() != 3 or local.shape[:2] != (B, Dl) or local.shape[2] < T:
            got = None if local is None else tuple(local.shape)
            raise ValueError(f"WavenetFullChannel: local_cond must be float (B={B}, "
                             f"Dl={Dl}, T>={T}), got {got}")

    def _run(self, x: torch.Tensor, g: torch.Tensor | None, local: torch.Tensor | None,
             states: list[ConvState] | None = None, last_only: bool = False,
             inputs: list[torch.Tensor] | None = None) -> torch.Tensor:
        """Tokens ``(B, C, T)`` → logits ``(B, C, T, V)`` (``T = 1`` with ``last_only``),
        optionally streaming; ``inputs`` collects each layer's input ``(B, Rc, T)``."""
        h = self.input_proj(rearrange(self.embed(x), "b c t e -> b (c e) t"))  # (B, Rc, T)
        skips = 0
        for i, layer in enumerate(self.layers):
            if inputs is not None:
                inputs.append(h)
            h, s = layer(h, g, local, None if states is None else states[i])
            skips = skips + s
        logits = self.out(skips[..., -1:] if last_only else skips)  # (B, C·V, T)
        logits = rearrange(logits, "b (c v) t -> b c t v", c=self.config.num_channels)
        return self.with_linear_forecast(logits, x, last_only)

    def forward(self, x: torch.Tensor, subject: torch.Tensor | None = None,
                local_cond: torch.Tensor | None = None) -> ModelOutput:
        """Next-token logits.

        Parameters
        ----------
        x : int64 (B, C, T) tokens in ``[0, V)``.
        subject : int64 (B,), required iff ``n_subjects > 0`` (global conditioning).
        local_cond : float (B, Dl, T), required iff ``local_channels > 0``; step t of the
            output sees ``local_cond[..., :t+1]`` only.

        Returns
        -------
        ModelOutput whose ``prediction`` is the logits (B, C, T, V); ``logits[:, :, t]``
        predicts ``x[:, :, t+1]``.
        """
        cfg = self.config
        check_tokens(x, cfg.num_channels, None, "WavenetFullChannel")
        B, _, T = x.shape
        self._check_local(local_cond, B, T)
        local = None if local_cond is None else local_cond[..., :T]
        return ModelOutput(self._run(x, self.subject_emb(subject, B), local))

    def example_inputs(self, batch_size: int = 2, seq_len: int | None = None) -> torch.Tensor:
        """Random tokens ``(batch_size, C, seq_len)`` (default 32 steps)."""
        cfg = self.config
        g = torch.Generator().manual_seed(0)
        x = torch.randint(0, cfg.vocab_size, (batch_size, cfg.num_channels, seq_len or 32),
                          generator=g)
        return x.to(self.input_proj.weight.device)

    @torch.no_grad()
    def generate(self, context: torch.Tensor, steps: int, *, temperature: float = 1.0,
                 top_k: int | None = None, top_p: float | None = None, use_cache: bool = True,
                 generator: torch.Generator | None = None, subject: torch.Tensor | None = None,
                 local_cond: torch.Tensor | None = None, progress: bool = False) -> torch.Tensor:
        """Sample ``steps`` new time steps after ``context (B, C, T0)``.

        Parameters
        ----------
        context : int64 (B, C, T0)
        temperature, top_k, top_p, generator : see :func:`ephys_gpt.layers.sampling.sample_logits`.
        use_cache : stream through per-layer ring buffers (primed on the last
            ``receptive_field`` context tokens) instead of re-running that window each step.
        subject : int64 (B,), global conditioning.
        local_cond : float (B, Dl, T0 + steps), local conditioning for context and future.

        Returns
        -------
        int64 (B, C, T0 + steps)
        """
        cfg = self.config
        check_token_context(context, cfg.num_channels, "WavenetFullChannel")
        B, _, T0 = context.shape
        self._check_local(local_cond, B, T0 + steps)
        g = self.subject_emb(subject, B)
        R = self.receptive_field
        st: dict = {"stream": None, "t": 0}

        def prime(window: torch.Tensor, cached: bool) -> torch.Tensor:
            L = window.shape[-1]
            crop = window[..., -max(R, cfg.linear_order):]  # the VAR's p lags may exceed R
            local = None if local_cond is None else local_cond[..., L - crop.shape[-1]:L]
            inputs: list[torch.Tensor] | None = [] if cached else None
            logits = self._run(crop, g, local, last_only=True, inputs=inputs)[:, :, -1]
            st["stream"] = WavenetStream(self, inputs, g, crop) if cached else None
            st["t"] = L
            return logits

        def step(tok: torch.Tensor) -> torch.Tensor:
            t = st["t"]
            local = None if local_cond is None else local_cond[..., t]
            st["t"] = t + 1
            return st["stream"].step(tok, local)

        # The CPU float32 stream calls NumPy's BLAS on single rows: one thread. Its own
        # threads next to torch's spinning ones made a step 20x slower with 2 threads here.
        with threadpool_limits(1, user_api="blas"):
            return generate_tokens(context, steps, prime=prime, step=step,
                                   use_cache=use_cache, temperature=temperature, top_k=top_k,
                                   top_p=top_p, generator=generator,
                                   uniforms=self.linear_uniforms(context.shape[0]),
                                   progress=progress, desc="WavenetFullChannel")

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in asdict(self.config).items())
