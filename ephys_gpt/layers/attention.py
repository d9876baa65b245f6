"""The one attention stack: multi-head attention with a preallocated key/value cache, learned
or rotary positions, causal (over time) or bidirectional (over channels, image axes), and the
pre-norm transformer block built on it. Every transformer model uses it: GPT2MEG (channel-wise
causal time attention), STGPT2MEG and the axial grid block (:mod:`ephys_gpt.layers.axial`),
BENDRForecast (causal over encoder frames, rotary), CNNLSTM (bidirectional, rotary) and the
video tokenizers' axial and frame attention (:mod:`ephys_gpt.layers.video_attention`).

Legend: N sequences (batch, possibly with channels or grid sites folded in), L (or T) tokens,
D model width, H heads, Dh = D / H head width.

Incremental decoding::

    caches = [KVCache(max_len) for _ in blocks]
    h = block(h_prompt, cache=caches[i])      # prime: (N, T0, D), causal inside the prompt
    h = block(h_new, cache=caches[i])         # each step: (N, 1, D) attends to all cached keys

The cache allocates its ``(N, H, max_len, Dh)`` key and value buffers once, on the first
update (in the keys' dtype and device: bf16 under bf16 autocast, which halves what a decode
step reads), and then only writes into them: a step costs O(cached length), never a
reallocation. ``KVCache(max_len, static=True)`` keeps the shapes of a step fixed (it attends
over the whole buffer with a length mask and takes its write position from a tensor), which
is what ``torch.compile`` without recompilation and CUDA graphs need.

How attention is computed (:func:`attention`)
---------------------------------------------
On CUDA and other accelerators: ``torch.nn.functional.scaled_dot_product_attention`` (flash /
memory-efficient kernels). On the CPU, SDPA's flash kernel is fast forward, but its backward
pass in bf16 takes several times its forward and more than in fp32, which made bf16 training
no faster than fp32. So bf16/fp16 attention with several queries runs there as *tiled
attention*: for a block of sequences and an (equal-sized) tile of query rows, the scores are
one batched matmul (bf16 on AMX under autocast, fp32 accumulation), the softmax uses fp32
arithmetic and stores the probabilities in bf16, and the output is a second batched matmul;
causal tiles skip the key blocks in their future. The probabilities are kept for the backward
pass (four batched matmuls and one fused softmax gradient per tile; dK and dV accumulate over
the tiles of a sequence block inside the matmuls) while they take at most
``TILED_SAVE_MAX_BYTES`` per layer (short windows; e.g. 13 MB for 16 channels x 400 steps x
4 heads); beyond, backward recomputes them tile by tile, so memory stays that of the inputs. Accuracy against fp64 is that of bf16 SDPA (< 1% relative error in
values and gradients; tested). fp32 attention (SDPA is faster than tiles in fp32), single
decode steps (one query: SDPA's flash kernel) and dropout on attention weights use SDPA.
``attention_backend("sdpa" | "tiled")`` forces one path (tests check the two agree).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from ephys_gpt.layers.rotary import RotaryEmbedding, apply_rotary

BACKENDS = ("auto", "sdpa", "tiled")
_backend = "auto"

TILED_ROWS = 128              # query rows per tile
TILED_ELEMENTS = 1 << 22      # scores per tile (sequences x rows x keys): 8 MB in bf16
TILED_SAVE_MAX_BYTES = 128 << 20  # keep the probabilities for backward up to this size per
                                  # call (one layer); beyond, backward recomputes them


@contextlib.contextmanager
def attention_backend(name: str) -> Iterator[None]:
    """Force the attention path inside a ``with`` block: ``"auto"`` (the default rule in the
    module docstring), ``"sdpa"`` or ``"tiled"``."""
    global _backend
    if name not in BACKENDS:
        raise ValueError(f"attention backend must be one of {BACKENDS}, got {name!r}")
    old, _backend = _backend, name
    try:
        yield
    finally:
        _backend = old


def autocast_dtype(device_type: str) -> torch.dtype | None:
    """The dtype ``torch.autocast`` casts to on ``device_type`` right now, or None (autocast
    off, or a device type without autocast such as ``meta``)."""
    try:
        if torch.is_autocast_enabled(device_type):
            return torch.get_autocast_dtype(device_type)
    except RuntimeError:
        pass
    return None


def _use_tiled(q: torch.Tensor, dropout_p: float) -> bool:
    if _backend == "sdpa":
        return False
    if dropout_p > 0:
        if _backend == "tiled":
            raise ValueError("tiled attention has no attention-weight dropout; use "
                             "attention_backend('sdpa') or dropout 0")
        return False
    if _backend == "tiled":
        return True
    if q.device.type != "cpu" or q.shape[-2] == 1:
        return False
    return q.dtype in (torch.bfloat16, torch.float16) or autocast_dtype("cpu") in (
        torch.bfloat16, torch.float16)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool,
              dropout_p: float = 0.0, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Scaled dot-product attention ``(N, H, Lq, Dh)`` x keys/values ``(N, Hk, Lk, Dh)``
    (``Hk`` divides ``H``; ``Hk < H``: grouped-query attention, query head ``i`` reads key
    head ``i // (H / Hk)``).

    ``causal``: query ``i`` sees keys ``<= i + Lk - Lq`` (bottom-right aligned, so new
    queries after ``Lk - Lq`` cached keys see the whole past). ``mask``: a boolean ``(Lk,)``
    or broadcastable ``(..., Lq, Lk)`` of the keys each query may see, used instead of
    ``causal`` (the static decode step). Returns ``(N, H, Lq, Dh)`` in ``q``'s dtype.
    """
    H, Hk = q.shape[-3], k.shape[-3]
    if H != Hk:  # grouped-query attention: query heads h*g .. h*g+g-1 share key head h
        if Hk < 1 or H % Hk:
            raise ValueError(f"attention: {H} query heads cannot share {Hk} key/value heads "
                             "(the query heads must be a multiple of them)")
        g = H // Hk
        if q.shape[-2] == 1 and (mask is None or mask.dim() <= 2):
            # one query per head (a decode step) sees every key: the g heads sharing a key
            # head become g query rows of it, so each cached key is read once, not g times
            # (SDPA reads the cache where it lies; tiles would copy it). A key mask without
            # head or query axes applies to those rows alike.
            y = F.scaled_dot_product_attention(q.reshape(*q.shape[:-3], Hk, g, q.shape[-1]),
                                               k, v, attn_mask=mask, dropout_p=dropout_p)
            return y.reshape(q.shape)
        k, v = k.repeat_interleave(g, dim=-3), v.repeat_interleave(g, dim=-3)
    Lq, Lk = q.shape[-2], k.shape[-2]
    if mask is not None:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)
    if _use_tiled(q, dropout_p):
        return tiled_attention(q, k, v, causal=causal)
    if not causal or Lq == 1:
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p)
    if Lq == Lk:
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True)
    rows = torch.arange(Lq, device=q.device)[:, None] + (Lk - Lq)
    keep = rows >= torch.arange(Lk, device=q.device)[None, :]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=keep, dropout_p=dropout_p)


# -- tiled attention (CPU training path) --------------------------------------------------------


def _tiles(n_seq: int, Lq: int, Lk: int, causal: bool) -> Iterator[tuple[int, int, int, int]]:
    """``(b0, b1, r0, r1)`` blocks of sequences x query rows of about TILED_ELEMENTS scores.
    Causal rows split into equal tiles of at most TILED_ROWS (each sees only the keys up to
    its last row); bidirectional tiles hold whole rows."""
    n_tiles = -(-Lq // TILED_ROWS) if causal else 1
    rows = -(-Lq // n_tiles)
    nb = max(1, TILED_ELEMENTS // (rows * Lk))
    for b0 in range(0, n_seq, nb):
        for r0 in range(0, Lq, rows):
            yield b0, min(n_seq, b0 + nb), r0, min(Lq, r0 + rows)


def _bias(cache: dict[int, torch.Tensor], n: int, like: torch.Tensor) -> torch.Tensor:
    """``(n, n)``: 0 on and below the diagonal, -inf above (keys in a query's future);
    made once per size and call."""
    if n not in cache:
        cache[n] = torch.full((n, n), float("-inf"), dtype=like.dtype,
                              device=like.device).triu_(1)
    return cache[n]


def _scores(qs: torch.Tensor, k: torch.Tensor, kend: int, bias: torch.Tensor | None
            ) -> torch.Tensor:
    """Probabilities of the (scaled) query rows ``qs (nb, n, Dh)`` over keys ``:kend`` (one
    tile). Causal tiles end on the diagonal: ``bias`` (:func:`_bias` of ``n``) masks
    the last ``n x n`` block, the only one holding keys in some row's future."""
    s = torch.bmm(qs, k[:, :kend].transpose(1, 2))  # (nb, n, kend)
    if bias is not None:
        n = bias.shape[0]
        s[:, :, kend - n:] += bias
    return torch.softmax(s, dim=-1)  # fp32 math inside, stored in the scores' dtype


class _TiledAttention(torch.autograd.Function):
    """Autograd of tiled attention over ``(S, L, Dh)`` (S = N·H sequences)."""

    @staticmethod
    def forward(ctx, q, k, v, causal: bool, save_probs: bool):
        q_scaled = q * q.shape[-1] ** -0.5
        o, probs = _tiled_forward(q_scaled, k, v, causal, keep=save_probs)
        ctx.causal = causal
        ctx.probs = probs
        ctx.save_for_backward(q_scaled, k, v)
        return o

    @staticmethod
    def backward(ctx, do):
        q_scaled, k, v = ctx.saved_tensors
        causal, probs = ctx.causal, ctx.probs
        ctx.probs = None
        S, Lq, Dh = q_scaled.shape
        Lk = k.shape[1]
        off = Lk - Lq
        do = do.contiguous()
        dq = torch.empty_like(q_scaled)
        dk, dv = torch.zeros_like(k), torch.zeros_like(v)
        biases: dict[int, torch.Tensor] = {}
        for i, (b0, b1, r0, r1) in enumerate(_tiles(S, Lq, Lk, causal)):
            kend = r1 + off if causal else Lk
            qs = q_scaled[b0:b1, r0:r1]
            kk, vv = k[b0:b1, :kend], v[b0:b1, :kend]
            if probs is not None:
                p = probs[i]
            else:
                p = _scores(qs, k[b0:b1], kend,
                            _bias(biases, r1 - r0, q_scaled) if causal else None)
            g = do[b0:b1, r0:r1]
            dv[b0:b1, :kend].baddbmm_(p.transpose(1, 2), g)
            dp = torch.bmm(g, vv.transpose(1, 2))
            ds = torch._softmax_backward_data(dp, p, -1, p.dtype)
            torch.bmm(ds, kk, out=dq[b0:b1, r0:r1])
            dk[b0:b1, :kend].baddbmm_(ds.transpose(1, 2), qs)
        dq.mul_(Dh ** -0.5)
        return dq, dk, dv, None, None


def _tiled_forward(q_scaled, k, v, causal: bool, keep: bool):
    """Tiled attention of queries already scaled by ``Dh**-0.5``: ``(o, probabilities of
    every tile or None)``."""
    S, Lq, Dh = q_scaled.shape
    Lk = k.shape[1]
    off = Lk - Lq
    if causal and off < 0:
        raise ValueError(f"causal attention needs at least as many keys ({Lk}) as queries ({Lq})")
    o = torch.empty_like(q_scaled)
    probs = [] if keep else None
    biases: dict[int, torch.Tensor] = {}
    for b0, b1, r0, r1 in _tiles(S, Lq, Lk, causal):
        kend = r1 + off if causal else Lk
        p = _scores(q_scaled[b0:b1, r0:r1], k[b0:b1], kend,
                    _bias(biases, r1 - r0, q_scaled) if causal else None)
        torch.bmm(p, v[b0:b1, :kend], out=o[b0:b1, r0:r1])
        if keep:
            probs.append(p)
    return o, probs


def tiled_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *,
                    causal: bool) -> torch.Tensor:
    """Attention as tiles of batched matmuls (see the module docstring); same arguments and
    result as :func:`attention` without dropout. Under autocast the inputs are cast to the
    autocast dtype (the matmuls run in it)."""
    dt = autocast_dtype(q.device.type)
    if dt is not None:
        q, k, v = q.to(dt), k.to(dt), v.to(dt)
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"attention inputs must share a dtype, got {q.dtype}, {k.dtype}, "
                         f"{v.dtype}")
    lead = q.shape[:-2]
    Lq, Lk, Dh = q.shape[-2], k.shape[-2], q.shape[-1]
    qf = q.reshape(-1, Lq, Dh).contiguous()
    kf = k.reshape(-1, Lk, Dh).contiguous()
    vf = v.reshape(-1, Lk, Dh).contiguous()
    with torch.autocast(q.device.type, enabled=False):
        if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
            saved = sum((b1 - b0) * (r1 - r0) * ((r1 + Lk - Lq) if causal else Lk)
                        for b0, b1, r0, r1 in _tiles(qf.shape[0], Lq, Lk, causal)) * qf.element_size()
            o = _TiledAttention.apply(qf, kf, vf, causal, saved <= TILED_SAVE_MAX_BYTES)
        else:
            o = _tiled_forward(qf * Dh ** -0.5, kf, vf, causal, keep=False)[0]
    return o.view(*lead, Lq, Dh)


# -- KV cache ----------------------------------------------------------------------------------


class KVCache:
    """Preallocated key/value buffers for one attention layer.

    Parameters
    ----------
    max_len : int
        Most time steps the cache can hold; appending beyond raises a ValueError (callers
        slide their window and :meth:`reset` first).
    static : bool
        Fixed-shape single steps (for ``torch.compile``/CUDA graphs): :meth:`update` with
        ``position`` (a 0-d int64 tensor) writes there and returns the whole buffers with a
        key mask ``(1, max_len)``; the caller then sets :attr:`length`.
    """

    def __init__(self, max_len: int, static: bool = False):
        if max_len < 1:
            raise ValueError(f"KVCache max_len must be >= 1, got {max_len}")
        self.max_len = int(max_len)
        self.static = static
        self.k: torch.Tensor | None = None
        self.v: torch.Tensor | None = None
        self.length = 0
        self._slots: torch.Tensor | None = None

    def reset(self) -> None:
        """Forget the cached steps (buffers are kept and reused)."""
        self.length = 0

    def _ensure(self, k: torch.Tensor) -> None:
        N, H, _, Dh = k.shape
        if (self.k is None or self.k.shape[:2] != (N, H) or self.k.shape[-1] != Dh
                or self.k.dtype != k.dtype or self.k.device != k.device):
            if self.length:
                raise ValueError("KVCache: batch/head shape or dtype changed mid-sequence "
                                 f"(cached {tuple(self.k.shape)} {self.k.dtype}, "
                                 f"got {tuple(k.shape)} {k.dtype}); call reset() first")
            self.k = k.new_zeros(N, H, self.max_len, Dh)
            self.v = k.new_zeros(N, H, self.max_len, Dh)
            self._slots = torch.arange(self.max_len, device=k.device)

    def update(self, k: torch.Tensor, v: torch.Tensor, position: torch.Tensor | None = None
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Append keys/values ``(N, H, T, Dh)``.

        Returns the cached keys and values ``(N, H, L, Dh)`` and None, or, for a static
        single step at ``position``, the whole buffers ``(N, H, max_len, Dh)`` and the mask
        of the slots written so far (``<= position``).
        """
        self._ensure(k)
        T = k.shape[2]
        if position is not None:  # (the caller advances ``length``: no Python state here)
            if T != 1:
                raise ValueError("a static KVCache step takes one new step at a time")
            self.k.index_copy_(2, position.view(1), k)
            self.v.index_copy_(2, position.view(1), v)
            return self.k, self.v, (self._slots <= position)[None]  # (1, max_len)
        end = self.length + T
        if end > self.max_len:
            raise ValueError(f"KVCache overflow: {self.length} cached + {T} new steps > "
                             f"max_len {self.max_len}")
        self.k[:, :, self.length:end] = k
        self.v[:, :, self.length:end] = v
        self.length = end
        return self.k[:, :, :end], self.v[:, :, :end], None


# -- modules -----------------------------------------------------------------------------------


def check_kv_heads(n_heads: int, kv_heads: int | None, name: str = "attention") -> None:
    """``kv_heads`` must be None or a positive integer dividing ``n_heads``."""
    if kv_heads is None:
        return
    if isinstance(kv_heads, bool) or not isinstance(kv_heads, int) or kv_heads < 1 or \
            n_heads % kv_heads:
        raise ValueError(f"{name}: kv_heads must be None or a positive integer dividing "
                         f"n_heads={n_heads}, got {kv_heads!r}")


class MultiHeadSelfAttention(nn.Module):
    """Multi-head self-attention over the second axis of ``(N, L, D)``.

    Parameters
    ----------
    d_model : int
        Width D (divisible by ``n_heads``).
    n_heads : int
        Number of heads H.
    causal : bool
        If True, token t attends to tokens <= t only (and a :class:`KVCache` may be used).
    dropout : float
        Dropout on attention weights and on the output projection (training only).
    bias : bool
        Bias in the projections.
    kv_heads : int | None
        Key/value heads (None: ``n_heads``). Fewer, dividing ``n_heads``, give grouped-query
        attention (Ainslie et al., 2023; one: multi-query attention, Shazeer, 2019): each
        group of ``n_heads / kv_heads`` query heads shares one key and value head, so a
        :class:`KVCache` holds, and a decode step reads, ``kv_heads / n_heads`` of the bytes.

    Parameters: ``qkv`` (one fused projection: queries, then keys, then values; ``3·D``
    outputs without grouping) and ``proj``. Positions are the caller's: learned embeddings
    added to the input, or rotary tables passed to :meth:`forward`.
    """

    def __init__(self, d_model: int, n_heads: int, causal: bool = True, dropout: float = 0.0,
                 bias: bool = True, kv_heads: int | None = None):
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"d_model ({d_model}) must be divisible by n_heads ({n_heads})")
        kv_heads = n_heads if kv_heads is None else kv_heads
        check_kv_heads(n_heads, kv_heads)
        self.n_heads, self.kv_heads, self.head_dim = n_heads, kv_heads, d_model // n_heads
        self.causal = causal
        self.dropout = dropout
        self.qkv = nn.Linear(d_model, d_model + 2 * kv_heads * self.head_dim, bias=bias)
        self.proj = nn.Linear(d_model, d_model, bias=bias)
        self.proj_dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, cache: KVCache | None = None,
                rope: tuple[torch.Tensor, torch.Tensor, int] | None = None,
                position: torch.Tensor | None = None) -> torch.Tensor:
        """``x (N, L, D)`` → ``(N, L, D)``.

        ``cache``: ``x`` holds the L newest tokens (following the cached ones); their keys
        and values are appended. ``rope``: rotary ``(cos, sin, n_axes)`` tables ``(L, Dh)``
        of the L tokens (see :mod:`ephys_gpt.layers.rotary`). ``position``: a 0-d int64
        tensor, the slot of a single new step in a static cache.
        """
        kv = self.kv_heads * self.head_dim
        q, k, v = (rearrange(t, "n l (h d) -> n h l d", d=self.head_dim) for t in
                   self.qkv(x).split([self.n_heads * self.head_dim, kv, kv], dim=-1))
        if rope is not None:
            cos, sin, n_axes = rope
            q, k = apply_rotary(q, cos, sin, n_axes), apply_rotary(k, cos, sin, n_axes)
        p = self.dropout if self.training else 0.0
        mask = None
        if cache is not None:
            if not self.causal:
                raise ValueError("a KVCache only makes sense for causal attention")
            k, v, mask = cache.update(k, v, position)
        y = attention(q, k, v, causal=self.causal, dropout_p=p, mask=mask)
        return self.proj_dropout(self.proj(rearrange(y, "n h l d -> n l (h d)")))


ACTIVATIONS = {"gelu": lambda x: F.gelu(x), "gelu_tanh": lambda x: F.gelu(x, approximate="tanh")}


class MLP(nn.Module):
    """Position-wise feed-forward: Linear(D, hidden) → GELU → Linear(hidden, D) → dropout.

    ``activation``: ``"gelu"`` (exact, erf) or ``"gelu_tanh"`` (GPT-2's tanh approximation;
    about 3x slower on CPUs). Parameters ``fc`` and ``proj``; weights saved by the former
    continuous transformer (an ``nn.Sequential``: ``0`` and ``3``) load too.
    """

    def __init__(self, d_model: int, hidden: int, dropout: float = 0.0, bias: bool = True,
                 activation: str = "gelu_tanh"):
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, got "
                             f"{activation!r}")
        self.act = ACTIVATIONS[activation]
        self.fc = nn.Linear(d_model, hidden, bias=bias)
        self.proj = nn.Linear(hidden, d_model, bias=bias)
        self.dropout = nn.Dropout(dropout)
        self._register_load_state_dict_pre_hook(_legacy_mlp_keys)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.proj(self.act(self.fc(x))))


def _legacy_mlp_keys(state_dict, prefix, *args) -> None:
    """Rename ``mlp.0.*`` / ``mlp.3.*`` (the former ``nn.Sequential`` MLP) to ``fc`` / ``proj``."""
    for old, new in (("0.", "fc."), ("3.", "proj.")):
        for name in ("weight", "bias"):
            key = prefix + old + name
            if key in state_dict:
                state_dict[prefix + new + name] = state_dict.pop(key)


class TransformerBlock(nn.Module):
    """Pre-norm block: ``x + attn(ln1(x))`` then ``x + mlp(ln2(x))`` (GPT-2, Radford et al.,
    2019). LayerNorm acts on each token's features only, so a causal block leaks nothing
    from the future. ``kv_heads``: see :class:`MultiHeadSelfAttention`.

    ``forward(x (N, L, D), cache=None, rope=None, position=None) -> (N, L, D)``.
    """

    def __init__(self, d_model: int, n_heads: int, mlp_ratio: float = 4, dropout: float = 0.0,
                 bias: bool = True, eps: float = 1e-5, causal: bool = True,
                 activation: str = "gelu_tanh", kv_heads: int | None = None):
        super().__init__()
        self.ln1 = nn.LayerNorm(d_model, eps=eps)
        self.attn = MultiHeadSelfAttention(d_model, n_heads, causal=causal, dropout=dropout,
                                           bias=bias, kv_heads=kv_heads)
        self.ln2 = nn.LayerNorm(d_model, eps=eps)
        self.mlp = MLP(d_model, int(d_model * mlp_ratio), dropout, bias, activation)

    def forward(self, x: torch.Tensor, cache: KVCache | None = None, rope=None,
                position: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.attn(self.ln1(x), cache=cache, rope=rope, position=position)
        return x + self.mlp(self.ln2(x))


class TransformerStack(nn.Module):
    """``n_layers`` :class:`TransformerBlock` s with rotary positions and a final LayerNorm
    (``kv_heads``: see :class:`MultiHeadSelfAttention`).

    ``forward(x (N, L, D), caches=None) -> (N, L, D)``; with ``caches`` (one
    :class:`KVCache` per block, :meth:`new_caches`), ``x`` holds only the new tokens, whose
    positions continue after the cached ones. Parameters: ``blocks.i.*``, ``ln_f``.
    """

    def __init__(self, d_model: int, n_layers: int, n_heads: int, mlp_ratio: float = 4.0,
                 dropout: float = 0.0, causal: bool = True, activation: str = "gelu",
                 kv_heads: int | None = None):
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"d_model ({d_model}) must be divisible by n_heads ({n_heads})")
        self.rotary = RotaryEmbedding(d_model // n_heads)
        self.blocks = nn.ModuleList(
            TransformerBlock(d_model, n_heads, mlp_ratio, dropout, causal=causal,
                             activation=activation, kv_heads=kv_heads) for _ in range(n_layers))
        self.ln_f = nn.LayerNorm(d_model)

    def new_caches(self, max_len: int) -> list[KVCache]:
        return [KVCache(max_len) for _ in self.blocks]

    def forward(self, x: torch.Tensor, caches: list[KVCache] | None = None) -> torch.Tensor:
        start = caches[0].length if caches else 0
        pos = torch.arange(start, start + x.shape[1], device=x.device)
        cos, sin = self.rotary.tables(pos)
        for i, block in enumerate(self.blocks):
            x = block(x, None if caches is None else caches[i], rope=(cos, sin, 1))
        return self.ln_f(x)


def init_gpt_weights(module: nn.Module, n_layers: int, std: float = 0.02) -> None:
    """GPT-2 initialisation: N(0, std) for linear/embedding weights, zero biases, and the
    residual output projections (``*.proj.weight``) scaled by ``1/sqrt(2·n_layers)``."""
    for name, p in module.named_parameters():
        if p.dim() >= 2:
            scale = 1 / math.sqrt(2 * n_layers) if name.endswith("proj.weight") else 1.0
            nn.init.normal_(p, mean=0.0, std=std * scale)
        elif name.endswith("bias"):
            nn.init.zeros_(p)
