"""vitkern.inspect (issue 14): attention maps, rollout, mean attention distance, position-embedding
similarity and filter PCA against timm's own attention probabilities (fused_attn=False, the
probabilities read at attn_drop) for the same weights and against direct implementations;
`capture` leaves the model's outputs unchanged; `python -m vitkern.inspect --quick` runs and its
PNGs open. Tiny models (img 32, patch 8, 2 blocks) keep the file fast.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import TRITON_DEVICE, assert_close

import vitkern
from vitkern import dispatch, inspect
from vitkern.model import capture_requests

timm = pytest.importorskip("timm")

pytestmark = pytest.mark.usefixtures("one_thread")
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def pair():
    """(timm model with eager attention, vitkern model with the same weights, images)."""
    torch.manual_seed(0)
    tm = timm.models.vision_transformer.VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2,
                                                         num_classes=5).eval()
    with torch.no_grad():  # informative position embeddings and class token (timm zero-inits some)
        tm.pos_embed.normal_(std=0.5)
        tm.cls_token.normal_(std=0.5)
    for blk in tm.blocks:
        blk.attn.fused_attn = False
    vm = vitkern.from_timm(tm).eval()
    return tm, vm, torch.randn(2, 3, 32, 32)


def _timm_probs(tm, images):
    """Per layer [batch, heads, tokens, tokens]: what timm's attn_drop receives."""
    seen = []
    hooks = [blk.attn.attn_drop.register_forward_hook(lambda m, i, o: seen.append(o.detach().double())) for blk in tm.blocks]
    try:
        with torch.no_grad():
            tm(images)
    finally:
        for h in hooks:
            h.remove()
    return seen


def _direct_rollout(maps, discard_ratio=0.0):
    """The formula written out in numpy, image by image: A' = A with the smallest entries zeroed
    (not [0, 0]), A'' = (A' + I) row-normalized, R = A''_L ... A''_1."""
    out = []
    for b in range(maps[0].shape[0]):
        r = np.eye(maps[0].shape[-1])
        for a in maps:
            a = a[b].numpy().astype(np.float64).copy()
            if discard_ratio:
                flat = a.reshape(-1)
                k = int(flat.size * discard_ratio)
                idx = np.argsort(flat, kind="stable")[:k]
                flat[idx[idx != 0]] = 0.0
                a = flat.reshape(a.shape)
            a = a + np.eye(a.shape[0])
            a = a / a.sum(axis=1, keepdims=True)
            r = a @ r
        out.append(r)
    return torch.from_numpy(np.stack(out))


def test_maps_equal_timms(pair):
    tm, vm, x = pair
    probs = _timm_probs(tm, x)
    cls = inspect.attention_maps(vm, x)
    full = inspect.attention_maps(vm, x, kind="full")
    assert len(cls) == len(full) == len(probs) == 2
    for layer, p in enumerate(probs):
        assert cls[layer].shape == (2, 2, 17) and full[layer].shape == (2, 17, 17)
        assert_close(cls[layer], p[:, :, 0], torch.float32, name=f"cls {layer}")
        assert_close(full[layer], p.mean(1), torch.float32, name=f"full {layer}")
    last = inspect.attention_maps(vm, x, layers=[-1])
    assert len(last) == 1 and torch.equal(last[0], cls[1])


@pytest.mark.parametrize("head_fusion,discard_ratio", [("mean", 0.0), ("max", 0.0), ("min", 0.5)])
def test_rollout_equals_timms_probabilities_rolled_out(pair, head_fusion, discard_ratio):
    tm, vm, x = pair
    fused = [{"mean": p.mean(1), "max": p.amax(1), "min": p.amin(1)}[head_fusion] for p in _timm_probs(tm, x)]
    got = inspect.attention_rollout(vm, x, head_fusion=head_fusion, discard_ratio=discard_ratio)
    assert got.shape == (2, 17, 17) and got.dtype == torch.float32
    assert_close(got, _direct_rollout(fused, discard_ratio), torch.float32, name="rollout")


@pytest.mark.parametrize("discard_ratio", [0.0, 0.3])
def test_rollout_formula_on_random_matrices(discard_ratio):
    maps = [torch.rand(3, 9, 9, dtype=torch.float64).softmax(-1) for _ in range(4)]
    got = inspect.rollout(maps, discard_ratio=discard_ratio)
    assert_close(got, _direct_rollout(maps, discard_ratio), torch.float64, name="rollout")
    assert_close(got.sum(-1), torch.ones(3, 9, dtype=torch.float64), torch.float64, name="rows sum to 1")


def test_mean_attention_distance_equals_timms(pair):
    tm, vm, x = pair
    ys, xs = torch.meshgrid(torch.arange(4.0) * 8, torch.arange(4.0) * 8, indexing="ij")
    pos = torch.stack([ys.reshape(-1), xs.reshape(-1)], -1).double()
    d = torch.cdist(pos, pos)
    want = torch.stack([(p[:, :, 1:, 1:] * d).sum(-1).mean(-1).mean(0) for p in _timm_probs(tm, x)])
    got = inspect.mean_attention_distance(vm, x)
    assert got.shape == (2, 2)
    assert_close(got, want, torch.float32, scale=4, name="mean attention distance")


@pytest.mark.skipif(not dispatch.triton_importable(), reason="triton is not importable")
def test_triton_model_maps_and_unchanged_outputs(pair):
    """The fused path: the same maps from the Triton kernels, and the logits inside capture() are
    bit for bit those of the plain forward."""
    tm, vm, x = pair
    vt = vitkern.from_timm(tm, backend="triton").eval().to(TRITON_DEVICE)
    xt = x.to(TRITON_DEVICE)
    with torch.no_grad():
        plain = vt(xt)
        with inspect.capture(vt, full=True) as cap:
            captured = vt(xt)
    assert torch.equal(plain, captured)
    for layer, p in enumerate(_timm_probs(tm, x)):
        assert_close(cap.layers[layer].prefix_probs[:, :, 0].cpu(), p[:, :, 0], torch.float32, name=f"cls {layer}")
        assert_close(cap.layers[layer].full.cpu(), p.mean(1), torch.float32, name=f"full {layer}")


def test_capture_leaves_outputs_and_model_unchanged(pair):
    _, vm, x = pair
    with torch.no_grad():
        plain = vm(x)
        with inspect.capture(vm) as cap:
            captured = vm(x)
        logits, layers = vm.forward_attention(x, full=True)
    assert torch.equal(plain, captured) and torch.equal(plain, logits)
    assert all(s.distance.shape == (2, 2) for s in cap.layers) and all(s.full.shape == (2, 17, 17) for s in layers)
    assert not capture_requests() and not vm._forward_pre_hooks
    with pytest.raises(RuntimeError, match="boom"):
        with inspect.capture(vm):
            raise RuntimeError("boom")
    assert not capture_requests() and not vm._forward_pre_hooks


def test_attention_extract_matches_timms(pair):
    tm, vm, x = pair
    theirs = timm.utils.AttentionExtract(tm, method="hook")(x)
    ours = inspect.AttentionExtract(vm)(x)
    assert list(ours) == list(theirs) == ["blocks.0.attn.attn_drop", "blocks.1.attn.attn_drop"]
    for name in ours:
        assert_close(ours[name], theirs[name].double().mean(1), torch.float32, name=name)
    cls = inspect.AttentionExtract(vm, kind="cls", layers=[1])(x)
    assert list(cls) == ["blocks.1.attn.attn_drop"] and cls["blocks.1.attn.attn_drop"].shape == (2, 2, 17)


def test_position_embedding_similarity(pair):
    _, vm, _ = pair
    sim = inspect.position_embedding_similarity(vm)
    assert sim.shape == (4, 4, 4, 4)
    pe = vm.pos_embed.detach()[0, 1:].double()
    r, c, r2, c2 = 1, 2, 3, 0
    a, b = pe[r * 4 + c], pe[r2 * 4 + c2]
    assert abs(sim[r, c, r2, c2].item() - (a @ b / (a.norm() * b.norm())).item()) < 1e-5
    assert_close(torch.diagonal(sim.reshape(16, 16)), torch.ones(16), torch.float32, name="self-similarity")


def test_embedding_filter_pca(pair):
    _, vm, _ = pair
    pcs = inspect.embedding_filter_pca(vm, k=5)
    assert pcs.shape == (5, 3, 8, 8)
    flat = pcs.reshape(5, -1).double()
    assert_close(flat @ flat.T, torch.eye(5, dtype=torch.float64), torch.float32, scale=5, name="orthonormal")
    # The top eigenvectors of the filters' covariance, independently (numpy eigh), up to sign.
    w = vm.patch_embed.proj.weight.detach().double().reshape(32, -1).numpy()
    w = w - w.mean(axis=0)
    vals, vecs = np.linalg.eigh(w.T @ w)
    top = torch.from_numpy(vecs[:, ::-1][:, :5].T.copy())
    assert_close((flat * top).sum(-1).abs(), torch.ones(5, dtype=torch.float64), torch.float32, scale=50, name="PCs")
    with pytest.raises(ValueError, match="k must be"):
        inspect.embedding_filter_pca(vm, k=0)


def test_errors(pair):
    _, vm, x = pair
    with pytest.raises(ValueError, match="kind must be"):
        inspect.attention_maps(vm, x, kind="heads")
    with pytest.raises(ValueError, match="out of range"):
        inspect.attention_maps(vm, x, layers=[5])
    with pytest.raises(ValueError, match="head_fusion"):
        inspect.attention_rollout(vm, x, head_fusion="median")
    with pytest.raises(TypeError, match="vitkern.ViT"):
        inspect.attention_maps(torch.nn.Linear(2, 2), x)
    with pytest.raises(ValueError, match="images must be"):
        inspect.attention_maps(vm, x[0])
    no_cls = vitkern.ViT(img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2, class_token=False,
                         global_pool="avg", num_classes=3).eval()
    with pytest.raises(ValueError, match="needs a class token"):
        inspect.attention_maps(no_cls, x)
    assert inspect.mean_attention_distance(no_cls, x).shape == (1, 2)  # every token is a patch


def test_cls_maps_need_a_class_token_not_just_prefix_tokens(pair):
    """Register tokens without a class token (num_prefix_tokens > 0): row 0 is register 0, whose
    rows kind='cls' used to return silently."""
    _, _, x = pair
    regs = vitkern.ViT(img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2, class_token=False, reg_tokens=2,
                       global_pool="avg", num_classes=3).eval()
    assert regs.num_prefix_tokens == 2
    with pytest.raises(ValueError, match="kind='cls' needs a class token"):
        inspect.attention_maps(regs, x)
    with pytest.raises(ValueError, match="kind='cls' needs a class token"):
        inspect.AttentionExtract(regs, kind="cls")
    assert inspect.attention_maps(regs, x, kind="full")[0].shape == (2, 18, 18)


def test_capture_is_per_thread(pair):
    """A forward and a capture of the same model in another thread while this thread's capture is
    open: each capture sees only its own thread's forwards (the other thread's forward used to reset
    this capture's layers and write its own statistics there, and a second capture was refused)."""
    import threading

    _, vm, x = pair
    x2 = torch.randn_like(x)
    with torch.no_grad():
        want, want2 = inspect.attention_maps(vm, x), inspect.attention_maps(vm, x2)
        plain2 = vm(x2)
    inside, done, results = threading.Event(), threading.Event(), {}

    def other_thread():
        inside.wait(60)
        try:
            with torch.no_grad():
                results["plain"] = vm(x2)
                results["maps"] = inspect.attention_maps(vm, x2)
        except BaseException as exc:  # reported below, in the test's thread
            results["error"] = exc
        finally:
            done.set()

    thread = threading.Thread(target=other_thread)
    thread.start()
    with torch.no_grad(), inspect.capture(vm) as cap:
        vm(x)
        inside.set()
        done.wait(60)
    thread.join(60)
    assert "error" not in results, repr(results.get("error"))
    assert torch.equal(results["plain"], plain2)
    for layer in range(len(vm.blocks)):
        assert torch.equal(cap.layers[layer].prefix_probs[:, :, 0], want[layer])
        assert torch.equal(results["maps"][layer], want2[layer])
    assert not capture_requests() and not vm._forward_pre_hooks


def test_cli_quick_runs_and_its_pngs_open(tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
    start = time.time()
    proc = subprocess.run([sys.executable, "-m", "vitkern.inspect", "--quick", "--out", str(tmp_path)], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=120)
    seconds = time.time() - start
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert seconds < 60, f"--quick took {seconds:.0f} s"
    assert "RANDOM weights" in proc.stderr and "--checkpoint" in proc.stderr and "--timm" in proc.stderr
    report = json.loads((tmp_path / "inspect.json").read_text())
    assert np.array(report["mean_attention_distance_px"]).shape == (3, 2)
    import matplotlib.image

    pngs = sorted(p for p in tmp_path.iterdir() if p.suffix == ".png")
    assert [p.name for p in pngs] == ["astronaut_attention.png", "attention_distance.png", "embedding_filters_pca.png",
                                      "pos_embed_similarity.png"]
    for p in pngs:
        img = matplotlib.image.imread(p)
        assert img.ndim == 3 and img.shape[0] > 200 and img.shape[1] > 300, (p.name, img.shape)
        assert img[..., :3].std() > 0.05, f"{p.name} is blank"


def _tiny(**kw):
    return vitkern.ViT(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=5, **kw)


def test_cli_loads_checkpoints_and_walks_a_folder(tmp_path, pair, monkeypatch):
    """.pth and .safetensors checkpoints load exactly; a folder of two images (the progress bar's
    path) gives a figure each and one JSON."""
    from safetensors.torch import save_file
    from skimage import io

    _, vm, _ = pair
    folder = tmp_path / "imgs"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for name in ("a.png", "b.png"):
        io.imsave(folder / name, rng.integers(0, 255, (40, 48, 3), dtype=np.uint8), check_contrast=False)
    torch.save(vm.state_dict(), tmp_path / "w.pth")
    save_file({k: v.contiguous() for k, v in vm.state_dict().items()}, str(tmp_path / "w.safetensors"))
    # The CLI builds --model by name; a tiny stand-in for the named variant keeps this fast.
    monkeypatch.setattr(vitkern, "create_model", lambda name, **kw: _tiny(**kw))
    for checkpoint in ("w.pth", "w.safetensors"):
        loaded, weights, _, _ = inspect._load_model(inspect._parse_args(["--checkpoint", str(tmp_path / checkpoint)]))
        assert weights == f"checkpoint:{checkpoint}"
        for (k, a), b in zip(loaded.state_dict().items(), vm.state_dict().values()):
            assert torch.equal(a, b), k
    out = tmp_path / "out"
    assert inspect.main(["--image", str(folder), "--checkpoint", str(tmp_path / "w.pth"), "--out", str(out)]) == 0
    report = json.loads((out / "inspect.json").read_text())
    assert report["weights"] == "checkpoint:w.pth"
    assert [Path(i["name"]).name for i in report["images"]] == ["a.png", "b.png"]
    assert (out / "a_attention.png").is_file() and (out / "b_attention.png").is_file()


def test_cli_bench_quick_records_every_variant(tmp_path):
    assert inspect.main(["--quick", "--bench", "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "bench.json").read_text())
    assert list(report["variants"]) == [name for name, _ in inspect.BENCH_VARIANTS]
    assert all(v["median_ms"] > 0 and v["iters"] >= 3 for v in report["variants"].values())
    assert report["variants"]["plain forward"]["extra_vs_plain"] == 0.0


def test_cli_loads_npz_and_hf_checkpoints(tmp_path, monkeypatch):
    """--checkpoint FILE.npz goes through vitkern.load_jax_npz (tested with real JAX arrays in
    test_weights.py); --hf DIR loads a transformers ViT saved with save_pretrained."""
    seen = {}

    def fake_npz(path, model):
        seen["npz"] = path
        return model

    monkeypatch.setattr(vitkern, "create_model", lambda name, **kw: _tiny(**kw))
    monkeypatch.setattr(vitkern, "load_jax_npz", fake_npz)
    _, weights, _, _ = inspect._load_model(inspect._parse_args(["--checkpoint", "ViT-B_16.npz"]))
    assert seen["npz"] == "ViT-B_16.npz" and weights == "checkpoint:ViT-B_16.npz"

    transformers = pytest.importorskip("transformers")
    cfg = transformers.ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                 intermediate_size=64, num_labels=3)
    hf = transformers.ViTForImageClassification(cfg).eval()
    hf.save_pretrained(tmp_path / "hf")
    model, weights, mean, std = inspect._load_model(inspect._parse_args(["--hf", str(tmp_path / "hf"), "--backend", "eager"]))
    assert weights == f"hf:{tmp_path / 'hf'}" and model.backend == "eager" and mean == std == (0.5, 0.5, 0.5)
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert_close(model(x), hf(pixel_values=x).logits, torch.float32, scale=10, name="hf logits")
        assert len(inspect.attention_maps(model, x)) == 2
