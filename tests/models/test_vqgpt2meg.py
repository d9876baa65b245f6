"""VQGPT2MEG: raster-order causality over codes, cached generation across window slides, the
frozen tokenizer, the self-contained export, co-training, config errors, and learning."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch

from ephys_gpt.dataset.image_layout import SensorTarget
from ephys_gpt.losses.vq import CodeCrossEntropy
from ephys_gpt.models.pretrained import from_pretrained, save_pretrained
from ephys_gpt.models.registry import build_model, get_model_spec
from ephys_gpt.models.vqgpt2meg import VQGPT2MEGConfig, file_sha256
from ephys_gpt.training.lit_model import LitModel, param_groups

TINY = get_model_spec("VQGPT2MEG").tiny_config
TOK = TINY["tokenizer_config"]


def _gpt(**over):
    torch.manual_seed(0)
    return build_model("VQGPT2MEG", {**TINY, **over})


def _tokenizer(images=None):
    """A tiny VideoGPTTokenizer, its codebook initialised (k-means) on ``images``."""
    torch.manual_seed(0)
    tok = build_model(TOK["model_name"], {**TOK["model_config"], "kmeans_init": True})
    tok.train()(images if images is not None else torch.randn(8, 8, 8, 8))
    return tok.eval()


def test_logits_of_a_code_depend_only_on_the_codes_before_it_in_raster_order():
    model = _gpt().eval()
    K = model.codebook_size
    codes = torch.randint(0, K, (2, 3, 4, 4), generator=torch.Generator().manual_seed(0))
    ref = model.code_logits(codes).flatten(1, 3)  # (B, L, K)
    L = ref.shape[1]
    for i in (0, 5, 16, 17, L - 1):  # within a frame, at frame starts, the last code
        changed = codes.clone().flatten(1)
        changed[:, i] = (changed[:, i] + 1) % K
        out = model.code_logits(changed.view_as(codes)).flatten(1, 3)
        assert torch.equal(out[:, :i + 1], ref[:, :i + 1]), f"code {i} leaked backwards"
        if i + 1 < L:  # and the next code does see it (the check is not vacuous)
            assert not torch.allclose(out[:, i + 1], ref[:, i + 1])


@pytest.mark.parametrize("slide,kv_heads", [(1, None), (2, None), (3, None), (2, 1)])
def test_cached_generation_equals_uncached_across_window_slides(slide, kv_heads):
    """Also with grouped key/value heads (kv_heads: 1 of 2 heads)."""
    model = _gpt(n_frames=3, slide_frames=slide, kv_heads=kv_heads).eval()
    codes = torch.randint(0, model.codebook_size, (2, 2, 4, 4),
                          generator=torch.Generator().manual_seed(1))
    cached = model.generate_codes(codes, 5, temperature=0.0, use_cache=True)
    plain = model.generate_codes(codes, 5, temperature=0.0, use_cache=False)
    assert cached.shape == (2, 7, 4, 4) and torch.equal(cached[:, :2], codes)
    assert torch.equal(cached, plain)
    g1, g2 = torch.Generator().manual_seed(4), torch.Generator().manual_seed(4)
    s1 = model.generate_codes(codes, 4, temperature=1.0, top_k=5, generator=g1)
    s2 = model.generate_codes(codes, 4, temperature=1.0, top_k=5, generator=g2,
                              use_cache=False)
    assert torch.equal(s1, s2)


def test_generate_returns_the_context_then_decoded_frames_and_channels():
    model = _gpt().eval()
    ctx = model.example_inputs(batch_size=2, seq_len=7)[..., :7]  # odd length: 1 sample left out
    out = model.generate(ctx, 5, temperature=0.0)
    assert out.shape == (2, 8, 8, 12) and out.dtype == ctx.dtype
    assert torch.equal(out[..., :7], ctx)
    codes = model.generate_codes(model.encode(ctx[..., 1:]), 3, temperature=0.0)
    expected = model.decode(codes)[..., 6:11]  # 6 frames: decoded in windows of n_frames=4
    torch.testing.assert_close(out[..., 7:], expected)
    pixels = torch.tensor([0, 9, 63])
    ch = model.generate_channels(ctx, 5, pixels, temperature=0.0)
    assert torch.equal(ch, out.flatten(1, 2)[:, pixels])
    with pytest.raises(ValueError, match="fewer than one latent frame"):
        model.generate(ctx[..., :1], 2)


def test_long_code_sequences_decode_in_windows_of_n_frames():
    model = _gpt(n_frames=4).eval()
    codes = torch.randint(0, model.codebook_size, (1, 9, 4, 4),
                          generator=torch.Generator().manual_seed(2))
    img = model.decode(codes)
    assert img.shape == (1, 8, 8, 18)
    tok = model.tokenizer
    torch.testing.assert_close(img[..., :8], tok.decode(codes[:, :4]))
    # frames 4-5 are decoded after frames 2-3, frames 8 after 6-7
    torch.testing.assert_close(img[..., 8:12], tok.decode(codes[:, 2:6])[..., 4:])
    torch.testing.assert_close(img[..., 16:], tok.decode(codes[:, 6:9])[..., 4:])


def test_frozen_tokenizer_gets_no_gradient_no_update_and_no_optimizer_slot(tmp_path):
    save_pretrained(_tokenizer(), tmp_path / "tok")
    lit = LitModel("VQGPT2MEG", {**{k: v for k, v in TINY.items() if k != "tokenizer_config"},
                                 "tokenizer_path": str(tmp_path / "tok")})
    model = lit.model
    before = {k: v.clone() for k, v in model.tokenizer.state_dict().items()}
    model.train()
    assert not model.tokenizer.training and model.blocks.training
    assert all(not p.requires_grad for p in model.tokenizer.parameters())
    in_optimizer = {id(p) for g in param_groups(model, 0.01) for p in g["params"]}
    assert not in_optimizer & {id(p) for p in model.tokenizer.parameters()}
    opt = torch.optim.AdamW([p for g in param_groups(model, 0.01) for p in g["params"]], lr=0.1)
    for _ in range(2):
        x = torch.randn(4, 8, 8, 8) * 3
        out = model(x)
        loss = CodeCrossEntropy()(out, None)["loss"]
        loss.backward()
        opt.step()
        opt.zero_grad()
    assert out.aux_losses == {} and out.extras == {}
    after = model.tokenizer.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before), "the frozen tokenizer moved"


def test_export_is_self_contained_and_records_the_tokenizer_source(tmp_path):
    tok = _tokenizer()
    save_pretrained(tok, tmp_path / "tok")
    model = build_model("VQGPT2MEG", {"tokenizer_path": str(tmp_path / "tok"), "n_frames": 4,
                                      "d_model": 24, "n_layers": 2, "n_heads": 2}).eval()
    x = model.example_inputs(batch_size=2)
    torch.testing.assert_close(model.encode(x), tok.encode(x))  # the exported tokenizer
    sha = file_sha256(tmp_path / "tok" / "model.safetensors")
    save_pretrained(model, tmp_path / "gpt")
    shutil.rmtree(tmp_path / "tok")  # another machine: the tokenizer folder is not there
    cfg = json.loads((tmp_path / "gpt" / "config.json").read_text())["model_config"]
    assert "tokenizer_path" not in cfg
    assert cfg["tokenizer_config"]["model_name"] == "VideoGPTTokenizer"
    assert cfg["tokenizer_source"] == {"path": str(tmp_path / "tok"), "sha256": sha}
    loaded = from_pretrained(tmp_path / "gpt")
    with torch.no_grad():
        assert torch.equal(loaded(x).prediction, model(x).prediction)
    assert torch.equal(loaded.generate(x, 4, temperature=0.0), model.generate(x, 4, temperature=0.0))
    # the export's weights hold the tokenizer once, under tokenizer.
    from safetensors.torch import load_file
    keys = load_file(str(tmp_path / "gpt" / "model.safetensors")).keys()
    tok_keys = [k for k in keys if k.startswith("tokenizer.")]
    assert sorted(k[len("tokenizer."):] for k in tok_keys) == sorted(tok.state_dict())


def test_cotraining_adds_the_tokenizer_losses_and_trains_it():
    model = _gpt(train_tokenizer=True).train()
    x = model.example_inputs(batch_size=2)
    out = model(x)
    assert set(out.aux_losses) == {"tokenizer_commitment"}
    assert "tokenizer_perplexity" in out.metrics
    assert out.extras["reconstruction"].shape == x.shape
    pixels = torch.tensor([0, 10, 27, 45, 63])
    target = SensorTarget(x.flatten(1, 2)[:, pixels], pixels.expand(2, -1))
    parts = CodeCrossEntropy(reconstruction_weight=0.5)(out, target)
    rec = out.extras["reconstruction"].flatten(1, 2)[:, pixels]
    mse = (rec - target.signal).pow(2).mean()
    assert float(parts["mse"]) == pytest.approx(float(mse.detach()), rel=1e-5)
    assert float(parts["loss"].detach()) == pytest.approx(float(parts["ce"] + 0.5 * mse.detach()),
                                                          rel=1e-5)
    (parts["loss"] + out.total_aux_loss()).backward()
    tok = dict(model.tokenizer.named_parameters())
    for name in ("down.0.conv.weight", "enc_out.conv.weight", "dec_in.conv.weight",
                 "up.0.conv.weight"):
        assert tok[name].grad is not None and tok[name].grad.abs().sum() > 0, name
    with pytest.raises(TypeError, match="SensorTarget"):
        CodeCrossEntropy()(out, x)


@pytest.mark.parametrize("over,match", [
    ({"tokenizer_path": "x"}, "exactly one of tokenizer_path"),
    ({"tokenizer_config": None}, "exactly one of tokenizer_path"),
    ({"tokenizer_config": {"name": "VideoGPTTokenizer"}}, "tokenizer_config must be a mapping"),
    ({"d_model": 32, "n_heads": 2}, "divisible by 6"),
    ({"slide_frames": 5}, "slide_frames"),
])
def test_config_errors_name_the_key(over, match):
    with pytest.raises(ValueError, match=match):
        VQGPT2MEGConfig(**{**TINY, **over})


def test_missing_tokenizer_folder_and_mismatched_inputs_are_clear_errors(tmp_path):
    cfg = {k: v for k, v in TINY.items() if k != "tokenizer_config"}
    with pytest.raises(ValueError, match="not an exported tokenizer.*model.safetensors"):
        VQGPT2MEGConfig(**cfg, tokenizer_path=str(tmp_path))
    model = _gpt(n_frames=2).eval()
    with pytest.raises(ValueError, match="exceed n_frames=2"):
        model(torch.randn(1, 8, 8, 6))
    with pytest.raises(ValueError, match="model was built for 8x8"):
        model(torch.randn(1, 16, 16, 4))
    with pytest.raises(ValueError, match="CodeCrossEntropy needs the model's own integer"):
        CodeCrossEntropy()(build_model(TOK["model_name"], TOK["model_config"])(
            torch.randn(1, 8, 8, 4)), None)


def test_tokenizer_path_resolves_against_the_file_that_names_it(tmp_path, monkeypatch):
    import yaml

    from ephys_gpt.store import write_session
    from ephys_gpt.training.config import load_config

    save_pretrained(_tokenizer(), tmp_path / "runs" / "tok")
    root = tmp_path / "store"
    for s in range(3):
        write_session(root, f"sub-{s}", [torch.randn(3, 200).numpy()], {
            "sfreq": 100.0, "ch_names": ["A", "B", "C"], "ch_types": ["mag"] * 3,
            "pos_2d": [[0, 0], [1, 0], [0, 1]], "chunk_samples": 200, "steps": []})
    (tmp_path / "cfg" / "models").mkdir(parents=True)
    model_cfg = {k: v for k, v in TINY.items() if k != "tokenizer_config"}
    (tmp_path / "cfg" / "models" / "gpt.yaml").write_text(
        yaml.safe_dump({**model_cfg, "tokenizer_path": "../../runs/tok"}))
    run = {"model_name": "VQGPT2MEG", "model_config": "models/gpt.yaml",
           "save_dir": "out", "datasplitter": {
               "dataset_root": "../store", "dataset_class": "ChunkDatasetImage",
               "dataset_kwargs": {"image_size": 8}, "example_seconds": 0.08}}
    (tmp_path / "cfg" / "train.yaml").write_text(yaml.safe_dump(run))
    want = str(tmp_path / "runs" / "tok")
    # in a model YAML: against that file's folder
    assert load_config(tmp_path / "cfg" / "train.yaml")["model_config"]["tokenizer_path"] == want
    # inline in the run YAML: against the run YAML's folder
    (tmp_path / "cfg" / "inline.yaml").write_text(yaml.safe_dump(
        {**run, "model_config": {**model_cfg, "tokenizer_path": "../runs/tok"}}))
    assert load_config(tmp_path / "cfg" / "inline.yaml")["model_config"]["tokenizer_path"] == want
    # on the command line: against the working directory, alone or in a whole block
    monkeypatch.chdir(tmp_path)
    for override in ("model_config.tokenizer_path=runs/tok",
                     "model_config={tokenizer_path: runs/tok, n_frames: 4, d_model: 24, "
                     "n_layers: 2, n_heads: 2}"):
        cfg = load_config(tmp_path / "cfg" / "train.yaml", [override])
        assert cfg["model_config"]["tokenizer_path"] == want, override


# -- learning ----------------------------------------------------------------------------------

def wave_images(n: int, T: int, seed: int) -> torch.Tensor:
    """Travelling waves ``(n, 8, 8, T)``: period 10 samples (5 latent frames), a random phase
    per window, a phase gradient across columns, and noise."""
    g = torch.Generator().manual_seed(seed)
    t = torch.arange(T, dtype=torch.float32)
    col = torch.arange(8, dtype=torch.float32)
    phase = torch.rand(n, 1, 1, 1, generator=g) * 2 * math.pi
    x = torch.sin(2 * math.pi * t / 10 + phase + 0.6 * col[None, None, :, None])
    x = x.expand(n, 8, 8, T) * (1 + 0.2 * torch.arange(8.0)[None, :, None, None] / 8)
    return x + 0.1 * torch.randn(n, 8, 8, T, generator=g)


def test_trained_on_codes_it_beats_both_code_baselines_on_held_out_windows(tmp_path):
    """On codes of structured synthetic data (a frozen tokenizer over travelling waves), a
    short training run predicts held-out next codes better than repeating the last code of
    each grid site and than each site's most frequent training code."""
    T = 16  # 8 latent frames
    train, test = wave_images(256, T, 0), wave_images(64, T, 1)
    save_pretrained(_tokenizer(train[:64]), tmp_path / "tok")
    torch.manual_seed(0)
    model = build_model("VQGPT2MEG", {"tokenizer_path": str(tmp_path / "tok"), "n_frames": 8,
                                      "d_model": 24, "n_layers": 2, "n_heads": 2})
    opt = torch.optim.AdamW([p for g in param_groups(model, 0.0) for p in g["params"]], lr=3e-3)
    codes_train = model.encode(train)  # (N, T', H', W'): the frozen tokenizer's codes
    model.train()
    for step in range(100):
        batch = codes_train[torch.randint(0, len(train), (16,),
                                          generator=torch.Generator().manual_seed(step))]
        logits = model.code_logits(batch)
        torch.nn.functional.cross_entropy(logits.flatten(0, -2), batch.flatten()).backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    with torch.no_grad():
        codes = model.encode(test)
        logits = model.code_logits(codes).flatten(2, 3)[:, 1:]
    tgt = codes.flatten(2)[:, 1:]  # latent frames >= 1, as EvalVQ scores them
    acc = (logits.argmax(-1) == tgt).float().mean().item()
    repeat = (codes.flatten(2)[:, :-1] == tgt).float().mean().item()
    sites = codes_train.flatten(2).permute(2, 0, 1).flatten(1)  # (S, N T')
    counts = torch.zeros(sites.shape[0], model.codebook_size).scatter_add_(
        1, sites, torch.ones(sites.shape, dtype=torch.float32))
    unigram = (counts.argmax(-1) == tgt).float().mean().item()
    assert acc > max(repeat, unigram) + 0.15, (acc, repeat, unigram)
