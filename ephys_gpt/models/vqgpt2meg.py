"""VQGPT2MEG: a causal transformer over the codes of a video VQ tokenizer of sensor images.

Two stages (the "tokenize the video, then a GPT over its codes" recipe of VideoGPT, Yan et
al. 2021, and Emu3, BAAI 2024): a tokenizer (:class:`~ephys_gpt.models.vq_tokenizer.
VQVideoTokenizer`: ``VideoGPTTokenizer`` or ``Emu3VisionVQ``) turns a window of sensor images
``(B, H, W, T)`` into codes ``(B, T', H', W')``, and a GPT predicts each code from the codes
before it.

**Order.** Codes are read in raster order: latent frames in time order, and within a frame
row by row, column by column (the tokenizer's own layout, flattened). Slot ``i`` of the
sequence holds the code *before* code ``i`` (a learned start token in slot 0) and predicts
code ``i``: the logits of code ``(t', r, c)`` depend only on the codes of frames ``< t'`` and
on the codes of frame ``t'`` before ``(r, c)``. The tokenizer's codes of frame ``t'`` depend
only on input frames ``< (t' + 1) * dt``, so the logits of frame ``t'`` depend only on input
frames ``< (t' + 1) * dt``, in training and evaluation (``output_time_dim=1``).

**Positions.** Every attention layer turns queries and keys by 3-D rotary positions over
(frame, row, column) (:class:`~ephys_gpt.layers.rotary.RotaryEmbedding` with three axes):
scores depend on the offsets in time, row and column, so the same spatial neighbourhood
one frame back is found the same way at every time step, and the time axis has no length
limit of its own (a window slides during generation without a position table). A learned
embedding of the row and of the column of the code a slot predicts is added to its input:
the code grid is anchored on the head (a code means a pattern at a given place), and a slot
knows which position it fills (rotary positions alone say only where tokens are relative to
each other).

**The tokenizer.** ``tokenizer_path``: an exported tokenizer folder (``model.safetensors`` +
``config.json``, loaded with :func:`~ephys_gpt.models.pretrained.from_pretrained`, no
pickles). With ``train_tokenizer: false`` (default) it is frozen: no gradient, always in
evaluation mode (the codebook never moves), and not in the optimizer (its parameters do not
require gradients). With ``train_tokenizer: true`` it is co-trained: its quantizer losses
join ``aux_losses`` (``tokenizer_commitment``...), its codebook metrics ``metrics``, and its
reconstruction goes to the loss as ``extras["reconstruction"]`` (``CodeCrossEntropy`` compares
it with the window at the sensors). The GPT reads code embeddings in both modes, so
generation is the same. ``tokenizer_config`` (``{model_name, model_config}``) builds a fresh,
untrained tokenizer instead (co-training from scratch, tests).

**Export.** The tokenizer is a submodule: its weights are saved once, under ``tokenizer.``,
in the GPT's ``model.safetensors``. The export's ``config.json`` describes the tokenizer
inline (``tokenizer_config``) and records where it came from (``tokenizer_source``: the
folder and the SHA-256 of its weights), so ``from_pretrained`` of the GPT needs nothing else,
on any machine.

Legend: B batch, H x W image, T frames (samples), T' x H' x W' code grid, S = H' W' codes
per latent frame, L = T' S codes, K codebook size, D width.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from ephys_gpt.dataset.image_layout import gather_channels
from ephys_gpt.layers.attention import (
    ACTIVATIONS,
    KVCache,
    TransformerBlock,
    autocast_dtype,
    check_kv_heads,
    init_gpt_weights,
)
from ephys_gpt.layers.rotary import RotaryEmbedding
from ephys_gpt.layers.sampling import check_sampling_args, sample_logits
from ephys_gpt.models.capabilities import TokenGenerator
from ephys_gpt.models.output import ModelOutput
from ephys_gpt.models.registry import register_model
from ephys_gpt.models.vq_tokenizer import VQVideoTokenizer

logger = logging.getLogger(__name__)


@dataclass
class VQGPT2MEGConfig:
    """VQGPT2MEG hyper-parameters (docs/models-vq.md)."""

    tokenizer_path: str | None = None    # exported tokenizer folder (model.safetensors + config.json)
    tokenizer_config: dict | None = None  # or {model_name, model_config}: a fresh tokenizer
    train_tokenizer: bool = False        # co-train the tokenizer (its losses join aux_losses)
    tokenizer_source: dict | None = None  # provenance written by the export (never read to build)
    n_frames: int = 32                   # longest context in latent frames (T' of the training
    # windows); generation beyond slides the window
    slide_frames: int | None = None      # generation past n_frames: the window jumps by this
    # many frames (None: max(1, n_frames // 4)); 1 keeps the longest context at every frame
    image_size: tuple[int, int] | None = None  # H x W of the images (None: the tokenizer's)
    d_model: int = 96                    # D; d_model / n_heads divisible by 6 (3-D rotary)
    n_layers: int = 4
    n_heads: int = 4
    kv_heads: int | None = None          # key/value heads, dividing n_heads (None: n_heads);
    # fewer shrink the KV cache a decode step reads (grouped-query attention)
    mlp_ratio: float = 4.0
    dropout: float = 0.0
    bias: bool = True
    activation: str = "gelu"             # MLP: "gelu" or "gelu_tanh"
    rope_base: float = 10000.0           # wavelength base of the rotary positions
    layer_norm_eps: float = 1e-5

    def __post_init__(self):
        name = type(self).__name__
        for key in ("n_frames", "d_model", "n_layers", "n_heads"):
            v = getattr(self, key)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name}: {key} must be a positive integer, got {v!r}")
        if (self.tokenizer_path is None) == (self.tokenizer_config is None):
            raise ValueError(f"{name}: give exactly one of tokenizer_path (an exported "
                             "tokenizer folder) and tokenizer_config ({model_name, "
                             "model_config}: a fresh tokenizer), got "
                             f"tokenizer_path={self.tokenizer_path!r} and tokenizer_config="
                             f"{self.tokenizer_config!r}")
        if self.tokenizer_config is not None and (
                not isinstance(self.tokenizer_config, dict)
                or not isinstance(self.tokenizer_config.get("model_name"), str)
                or set(self.tokenizer_config) - {"model_name", "model_config"}):
            raise ValueError(f"{name}: tokenizer_config must be a mapping with model_name "
                             f"(e.g. VideoGPTTokenizer) and model_config, got "
                             f"{self.tokenizer_config!r}")
        if self.tokenizer_path is not None:
            folder = Path(self.tokenizer_path)
            missing = [f for f in ("model.safetensors", "config.json") if not (folder / f).is_file()]
            if missing:
                raise ValueError(f"{name}: tokenizer_path {folder} is not an exported tokenizer "
                                 f"(missing {', '.join(missing)}); train one first, e.g. "
                                 "`ephys-gpt train --args configs/videogpttokenizer/train.yaml` "
                                 "writes <save_dir>/export")
        hd = self.d_model // self.n_heads
        if self.d_model % self.n_heads or hd % 6:
            raise ValueError(f"{name}: d_model / n_heads must be an integer divisible by 6 "
                             f"(3-D rotary positions turn three even segments of each head), "
                             f"got d_model={self.d_model}, n_heads={self.n_heads}")
        if self.slide_frames is not None and not 1 <= self.slide_frames < self.n_frames + 1:
            raise ValueError(f"{name}: slide_frames must be None or in [1, n_frames="
                             f"{self.n_frames}], got {self.slide_frames}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"{name}: dropout must be in [0, 1), got {self.dropout}")
        check_kv_heads(self.n_heads, self.kv_heads, name)
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"{name}: activation must be one of {sorted(ACTIVATIONS)}, got "
                             f"{self.activation!r}")
        if self.image_size is not None:
            self.image_size = tuple(int(v) for v in self.image_size)

    @property
    def slide(self) -> int:
        return min(self.slide_frames or max(1, self.n_frames // 4), self.n_frames)


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _load_tokenizer(cfg: VQGPT2MEGConfig) -> tuple[VQVideoTokenizer, dict, dict | None]:
    """The tokenizer, its inline description ``{model_name, model_config}`` and its source."""
    from ephys_gpt.models.pretrained import from_pretrained, load_export_config
    from ephys_gpt.models.registry import build_model

    if cfg.tokenizer_path is not None:
        folder = Path(cfg.tokenizer_path)
        tok = from_pretrained(folder)
        exported = load_export_config(folder)
        spec = {"model_name": exported["model_name"], "model_config": exported["model_config"]}
        source = {"path": str(folder), "sha256": file_sha256(folder / "model.safetensors")}
        logger.info("VQGPT2MEG: tokenizer %s from %s", spec["model_name"], folder)
    else:
        spec = {"model_name": cfg.tokenizer_config["model_name"],
                "model_config": dict(cfg.tokenizer_config.get("model_config") or {})}
        tok = build_model(spec["model_name"], spec["model_config"])
        source = cfg.tokenizer_source
    if not isinstance(tok, VQVideoTokenizer):
        raise ValueError(f"VQGPT2MEG needs a video VQ tokenizer of sensor images "
                         f"(VideoGPTTokenizer, Emu3VisionVQ); {spec['model_name']} is not one")
    if tok.num_quantizers != 1:
        raise ValueError(f"VQGPT2MEG reads one code per grid site; the tokenizer "
                         f"{spec['model_name']} has num_quantizers={tok.num_quantizers}")
    return tok, spec, source


@register_model(
    "VQGPT2MEG",
    input_kind="image",
    causal=True,
    capabilities=(TokenGenerator,),
    tiny_config={"tokenizer_config": {"model_name": "VideoGPTTokenizer", "model_config": {
        "hidden": 16, "n_res_layers": 1, "n_heads": 2, "downsample": (2, 2, 2),
        "embed_dim": 8, "codebook_size": 16, "groups": 4, "image_size": (8, 8),
        "kmeans_init": False}},  # a random codebook: codes vary with the input from the start
        "n_frames": 4, "d_model": 24, "n_layers": 2, "n_heads": 2},
    output_time_dim=1,
    default_loss="CodeCrossEntropy",
    config_class=VQGPT2MEGConfig,
)
class VQGPT2MEG(nn.Module):
    """GPT over a video VQ tokenizer's codes: images (B, H, W, T) → code logits (B, T', H', W', K)."""

    def __init__(self, **config):
        super().__init__()
        self.config = cfg = VQGPT2MEGConfig(**config)
        self._model_config = dict(config)
        tok, self.tokenizer_spec, self.tokenizer_source = _load_tokenizer(cfg)
        self.image_size = cfg.image_size or tuple(tok.image_size)
        _, gh, gw = tok.latent_shape(tok.time_downsample, *self.image_size)
        self.grid = (gh, gw)
        K, D = tok.codebook_size, cfg.d_model
        self.codebook_size = K
        self.bos = K                                # the start token's id
        self.tok_emb = nn.Embedding(K + 1, D)
        self.row_emb = nn.Embedding(gh, D)
        self.col_emb = nn.Embedding(gw, D)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(
            TransformerBlock(D, cfg.n_heads, cfg.mlp_ratio, cfg.dropout, cfg.bias,
                             cfg.layer_norm_eps, activation=cfg.activation,
                             kv_heads=cfg.kv_heads)
            for _ in range(cfg.n_layers))
        self.ln_f = nn.LayerNorm(D, eps=cfg.layer_norm_eps)
        self.head = nn.Linear(D, K, bias=False)
        for part in (self.tok_emb, self.row_emb, self.col_emb, self.blocks, self.head):
            init_gpt_weights(part, cfg.n_layers)
        self.rotary = RotaryEmbedding(D // cfg.n_heads, n_axes=3, base=cfg.rope_base)
        self.tokenizer = tok
        if not cfg.train_tokenizer:
            tok.requires_grad_(False)
            tok.eval()

    # -- config and modes -------------------------------------------------------------------------
    @property
    def model_config(self) -> dict:
        """The config that rebuilds this model from its export alone: the tokenizer described
        inline (its weights are in the state dict, under ``tokenizer.``) and its source
        recorded, instead of a ``tokenizer_path`` that may not exist elsewhere."""
        cfg = dict(self._model_config)
        if cfg.pop("tokenizer_path", None) is not None:
            cfg["tokenizer_config"] = self.tokenizer_spec
            cfg["tokenizer_source"] = self.tokenizer_source
        return cfg

    @model_config.setter
    def model_config(self, value: dict) -> None:  # set by registry.build_model
        self._model_config = dict(value)

    def train(self, mode: bool = True):
        super().train(mode)
        if not self.config.train_tokenizer:
            self.tokenizer.eval()  # frozen: the codebook and norms never move
        return self

    # -- the code grid ------------------------------------------------------------------------------
    @property
    def codes_per_frame(self) -> int:
        return self.grid[0] * self.grid[1]

    def _check_images(self, x: torch.Tensor, what: str) -> None:
        if not isinstance(x, torch.Tensor) or x.ndim != 4 or not x.is_floating_point():
            got = (f"{x.dtype} {tuple(x.shape)}" if isinstance(x, torch.Tensor)
                   else type(x).__name__)
            raise ValueError(f"VQGPT2MEG.{what} expects float sensor images (B, H, W, T), "
                             f"got {got}")
        if tuple(x.shape[1:3]) != self.image_size:
            raise ValueError(f"VQGPT2MEG.{what}: images are {x.shape[1]}x{x.shape[2]} but the "
                             f"model was built for {self.image_size[0]}x{self.image_size[1]} "
                             "(model_config.image_size; datasplitter.dataset_kwargs.image_size)")

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Images ``(B, H, W, T)`` → the tokenizer's codes ``(B, T', H', W')``, in fp32
        whatever the autocast around it (the codes do not depend on the precision)."""
        self._check_images(images, "encode")
        with torch.no_grad(), torch.autocast(images.device.type, enabled=False):
            return self.tokenizer.encode(images.float())

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """Codes ``(B, T', H', W')`` → images ``(B, H, W, T' dt)``, decoded ``n_frames`` latent
        frames at a time (as the tokenizer was trained): beyond that, each further block of
        ``n_frames // 2`` frames is decoded after the ``n_frames - n_frames // 2`` frames
        before it."""
        n, T = self.config.n_frames, codes.shape[1]
        with torch.no_grad(), torch.autocast(codes.device.type, enabled=False):
            if T <= n:
                return self.tokenizer.decode(codes)
            dt, keep = self.tokenizer.time_downsample, max(1, n // 2)
            parts = [self.tokenizer.decode(codes[:, :n])]
            for s in range(n, T, keep):
                e = min(s + keep, T)
                img = self.tokenizer.decode(codes[:, s - (n - keep):e])
                parts.append(img[..., -(e - s) * dt:])
            return torch.cat(parts, dim=-1)

    def _positions(self, start: int, n: int, device) -> torch.Tensor:
        """(frame, row, column) of window slots ``start .. start + n - 1``: ``(n, 3)`` int64."""
        idx = torch.arange(start, start + n, device=device)
        S, W = self.codes_per_frame, self.grid[1]
        return torch.stack([idx // S, (idx % S) // W, idx % W], dim=-1)

    def _run(self, tokens: torch.Tensor, start: int = 0,
             caches: list[KVCache] | None = None) -> torch.Tensor:
        """Slot contents ``(B, n)`` (codes, or the start token) at window slots ``start ..``
        → logits ``(B, n, K)``: slot ``j`` predicts the code at window position ``j``."""
        pos = self._positions(start, tokens.shape[1], tokens.device)
        h = self.tok_emb(tokens) + self.row_emb(pos[:, 1]) + self.col_emb(pos[:, 2])
        low = autocast_dtype(h.device.type)
        if low is not None:
            h = h.to(low)
        h = self.drop(h)
        cos, sin = self.rotary.tables(pos)
        for i, block in enumerate(self.blocks):
            h = block(h, None if caches is None else caches[i], rope=(cos, sin, 3))
        return self.head(self.ln_f(h))

    # -- training ----------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> ModelOutput:
        """Next-code logits of a window of sensor images.

        Parameters
        ----------
        x : float (B, H, W, T), T a multiple of the tokenizer's time downsampling and at most
            ``n_frames`` latent frames.

        Returns
        -------
        ModelOutput with ``prediction`` the logits (B, T', H', W', K) of every code, each from
        the codes before it in raster order, and ``target`` the codes (B, T', H', W'). With a
        co-trained tokenizer: its quantizer losses in ``aux_losses`` (``tokenizer_*``), its
        codebook metrics in ``metrics`` and its reconstruction (B, H, W, T) in
        ``extras["reconstruction"]``.
        """
        self._check_images(x, "forward")
        aux, metrics, extras = {}, {}, {}
        if self.config.train_tokenizer:
            q = self.tokenizer.quantize(x)
            codes = q.codes
            aux = {f"tokenizer_{k}": v for k, v in q.losses.items()}
            metrics = {f"tokenizer_{k}": v for k, v in q.metrics.items()}
            extras = {"reconstruction": self.tokenizer.decode_images(q.latents)}
        else:
            codes = self.encode(x)
        return ModelOutput(self.code_logits(codes), aux_losses=aux, metrics=metrics,
                           target=codes, extras=extras)

    def code_logits(self, codes: torch.Tensor) -> torch.Tensor:
        """Teacher-forced logits ``(B, T', H', W', K)`` of codes ``(B, T', H', W')``, each
        from the codes before it in raster order (the first from the start token only)."""
        if codes.ndim != 4 or tuple(codes.shape[2:]) != self.grid or codes.is_floating_point():
            raise ValueError(f"codes must be integers (B, T', {self.grid[0]}, {self.grid[1]}), "
                             f"got {codes.dtype} {tuple(codes.shape)}")
        B, T = codes.shape[:2]
        if T > self.config.n_frames:
            raise ValueError(f"VQGPT2MEG: {T} latent frames ({T * self.tokenizer.time_downsample}"
                             f" samples) exceed n_frames={self.config.n_frames}; raise "
                             "model_config.n_frames or shorten datasplitter.example_seconds")
        flat = codes.reshape(B, -1)
        start = flat.new_full((B, 1), self.bos)
        logits = self._run(torch.cat([start, flat[:, :-1]], dim=1))  # (B, L, K)
        return logits.view(*codes.shape, -1)

    def example_inputs(self, batch_size: int = 2, seq_len: int | None = None) -> torch.Tensor:
        """Random images ``(B, H, W, T)``, T = ``seq_len`` rounded up to whole latent frames
        (default ``min(n_frames, 4)`` frames)."""
        dt = self.tokenizer.time_downsample
        frames = min(self.config.n_frames, 4) if seq_len is None else -(-int(seq_len) // dt)
        g = torch.Generator().manual_seed(0)
        x = torch.randn(batch_size, *self.image_size, frames * dt, generator=g)
        return x.to(self.head.weight.device)

    # -- generation ------------------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, context: torch.Tensor, steps: int, *, temperature: float = 1.0,
                 top_k: int | None = None, top_p: float | None = None, use_cache: bool = True,
                 generator: torch.Generator | None = None, progress: bool = False
                 ) -> torch.Tensor:
        """Continue a window of sensor images by ``steps`` samples.

        The context is encoded to codes (its first ``T mod dt`` samples are left out so that
        it ends on a latent frame), ``ceil(steps / dt)`` latent frames of codes are sampled in
        raster order (:meth:`generate_codes`), and the codes are decoded (:meth:`decode`).

        Parameters
        ----------
        context : float (B, H, W, T), T >= dt.
        steps : new samples (frames of images).
        temperature, top_k, top_p, generator : see :func:`ephys_gpt.layers.sampling.sample_logits`
            (``temperature=0``: greedy).
        use_cache : decode with per-layer KV caches (each code attends over the cache)
            instead of re-running the window for every code; both give the same codes.

        Returns
        -------
        float (B, H, W, T + steps): the context unchanged, then the generated images. Read
        the sensors with :meth:`generate_channels` (or
        :func:`~ephys_gpt.dataset.image_layout.gather_channels`).
        """
        check_sampling_args(temperature, top_k, top_p)
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
            raise ValueError(f"steps must be an integer >= 0, got {steps!r}")
        self._check_images(context, "generate")
        dt, T = self.tokenizer.time_downsample, context.shape[-1]
        if T < dt:
            raise ValueError(f"VQGPT2MEG.generate: the context has {T} samples, fewer than one "
                             f"latent frame ({dt} samples)")
        if steps == 0:
            return context.clone()
        skip = T % dt
        codes = self.encode(context[..., skip:])
        frames = -(-steps // dt)
        codes = self.generate_codes(codes, frames, temperature=temperature, top_k=top_k,
                                    top_p=top_p, use_cache=use_cache, generator=generator,
                                    progress=progress)
        images = self.decode(codes)[..., T - skip:T - skip + steps]
        return torch.cat([context, images.to(context.dtype)], dim=-1)

    @torch.no_grad()
    def generate_channels(self, context: torch.Tensor, steps: int, pixels: torch.Tensor,
                          **sampling) -> torch.Tensor:
        """:meth:`generate` read at the sensors: ``(B, C, T + steps)`` from ``pixels`` (C,)
        (the flat sensor pixels, ``SensorTarget.pixels`` or ``ImageLayout.flat_index``)."""
        return gather_channels(self.generate(context, steps, **sampling),
                               torch.as_tensor(pixels))

    @torch.no_grad()
    def generate_codes(self, codes: torch.Tensor, frames: int, *, temperature: float = 1.0,
                       top_k: int | None = None, top_p: float | None = None,
                       use_cache: bool = True, generator: torch.Generator | None = None,
                       progress: bool = False) -> torch.Tensor:
        """Append ``frames`` latent frames to ``codes (B, T0', H', W')`` → ``(B, T0' + frames,
        H', W')``, one code at a time in raster order.

        The window (a start token, then whole latent frames) holds at most ``n_frames``
        frames, the one being generated included; when the next code falls outside, the
        window jumps forward by ``slide_frames`` frames and is re-read (the caches are
        re-primed, positions restart at frame 0). The cached and the uncached path follow
        exactly this rule, so greedy decoding gives the same codes.
        """
        check_sampling_args(temperature, top_k, top_p)
        cfg, S = self.config, self.codes_per_frame
        if codes.ndim != 4 or tuple(codes.shape[2:]) != self.grid or codes.is_floating_point():
            raise ValueError(f"codes must be integers (B, T', {self.grid[0]}, {self.grid[1]}), "
                             f"got {codes.dtype} {tuple(codes.shape)}")
        B, T0 = codes.shape[:2]
        total = (T0 + frames) * S
        seq = codes.new_empty(B, total)
        seq[:, :T0 * S] = codes.reshape(B, -1)
        caches = [KVCache(cfg.n_frames * S) for _ in self.blocks]
        f0, primed = 0, False
        for p in tqdm(range(T0 * S, total), desc="VQGPT2MEG", disable=not progress,
                      leave=False):
            f = p // S
            if f - f0 >= cfg.n_frames:  # the window is full: slide by whole frames
                f0, primed = f - (cfg.n_frames - cfg.slide), False
            if primed:  # slot p - f0 S holds code p - 1
                logits = self._run(seq[:, p - 1:p], p - f0 * S, caches)[:, -1]
            else:
                window = torch.cat([seq.new_full((B, 1), self.bos), seq[:, f0 * S:p]], dim=1)
                if use_cache:
                    for cache in caches:
                        cache.reset()
                logits = self._run(window, 0, caches if use_cache else None)[:, -1]
                primed = use_cache
            seq[:, p] = sample_logits(logits.float(), temperature, top_k, top_p, generator)
        return seq.view(B, T0 + frames, *self.grid)

    def extra_repr(self) -> str:
        cfg = {k: v for k, v in asdict(self.config).items()
               if k not in ("tokenizer_config", "tokenizer_source")}
        return ", ".join(f"{k}={v}" for k, v in cfg.items())
