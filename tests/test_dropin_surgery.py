"""Module surgery on vitkern.ViT behaves as on timm's VisionTransformer (issue 12, part A).

A block fuses its sub-modules only while they are the plain ones vitkern built; hooks, swapped
modules and parametrizations make it call them as timm's Block does, and PEFT LoRA layers stay on
the fused ops (vitkern.fusion). Each test runs the model once before the surgery, so a cached
fusion plan exists and its invalidation is what is tested. Also: torch.fx feature extraction
(torchvision's create_feature_extractor), an empty batch on every backend, torch.compile.

Everything is fp32 on CPU with a tiny config; the Triton cases run in the interpreter.
"""

from __future__ import annotations

import collections

import pytest
import torch
import torch.nn as nn

import vitkern
from conftest import TRITON_DEVICE, assert_max_diff
from vitkern import dispatch
from vitkern.model import Attention, Block, Mlp

timm = pytest.importorskip("timm")
peft = pytest.importorskip("peft")
from timm.models.vision_transformer import VisionTransformer  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=5)
LORA_TARGETS = ["attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2"]
TOL = 1e-5


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item()


def _grad_close(ours: torch.Tensor, theirs: torch.Tensor) -> bool:
    """Within TOL of the gradient's magnitude (a parameter's gradient sums over batch and tokens)."""
    return _max_diff(ours, theirs) <= TOL * max(1.0, theirs.abs().max().item())


def _pair(**overrides):
    """(timm model, vitkern model) with the same random weights (LayerNorm affine and biases too)."""
    kwargs = {**TINY, **overrides}
    tm = VisionTransformer(**kwargs).eval()
    with torch.no_grad():
        for name, p in tm.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    vk = vitkern.ViT(**kwargs).eval()
    vk.load_state_dict(tm.state_dict())
    return tm, vk


def _backend(name: str):
    if name == "triton":
        ok, reasons = vitkern.available_backends()["triton"]
        if not ok:
            pytest.fail("the Triton backend must be usable in the tests (interpreter on CPU): " + "; ".join(reasons))
        return TRITON_DEVICE
    return "cpu"


class _OpLog:
    """Which vitkern ops ran (through dispatch.select) and which torch / PEFT modules' forward ran."""

    def __init__(self, monkeypatch):
        self.ops = collections.Counter()
        self.modules = collections.Counter()
        select = dispatch.select

        def spy_select(op, backend, device, call):
            self.ops[op] += 1
            return select(op, backend, device, call)

        monkeypatch.setattr(dispatch, "select", spy_select)
        classes = [nn.Linear, nn.LayerNorm, nn.GELU, nn.Conv2d, Attention, Mlp, peft.tuners.lora.layer.Linear]
        for cls in classes:
            monkeypatch.setattr(cls, "forward", self._counting(cls, cls.forward))

    def _counting(self, cls, forward):
        def counted(module, *args, **kwargs):
            self.modules[cls.__name__ if cls.__module__.startswith(("torch", "vitkern")) else "peft.Linear"] += 1
            return forward(module, *args, **kwargs)
        return counted

    def clear(self):
        self.ops.clear()
        self.modules.clear()


# --------------------------------------------------------------------------------------------
# The fused path on an unmodified model


def test_unmodified_model_runs_only_fused_ops_and_caches_its_plan(monkeypatch):
    tm, vk = _pair()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        vk(x)
        plans = [blk._plan for blk in vk.blocks]
        assert all(p is not None and p.attn and p.mlp for p in plans)
        log = _OpLog(monkeypatch)
        out = vk(x)
    assert dict(log.ops) == {"patch_embed": 1, "ln_linear": 4, "attention": 2, "linear": 4, "layer_norm": 1}
    assert log.modules == {"Linear": 1}, dict(log.modules)  # the head, as in timm
    assert [blk._plan for blk in vk.blocks] == plans and all(a is b for a, b in zip((blk._plan for blk in vk.blocks), plans))
    with torch.no_grad():
        assert_max_diff(out, tm(x), TOL)


def test_cached_plan_is_cheaper_than_deciding_per_call():
    """The per-call check (key + classes) against rebuilding the plan, which reads every hook dict."""
    import timeit

    blk = vitkern.ViT(**TINY).blocks[0]
    blk._current_plan()
    cached = min(timeit.repeat(blk._current_plan, number=500, repeat=5))
    rebuilt = min(timeit.repeat(blk._make_plan, number=500, repeat=5))
    assert cached < rebuilt / 3, f"cached plan {cached / 500 * 1e6:.2f} us vs rebuilt {rebuilt / 500 * 1e6:.2f} us"


# --------------------------------------------------------------------------------------------
# PEFT LoRA


def _lora_config():
    # init_lora_weights=False: random A and B, so the low-rank term and every gradient are non-zero.
    return peft.LoraConfig(r=4, lora_alpha=8, target_modules=LORA_TARGETS, lora_dropout=0.0, init_lora_weights=False)


def _lora_pair(device, depth=TINY["depth"]):
    tm, vk = _pair(depth=depth)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        vk(x)  # a cached plan exists before the surgery
    pt = peft.get_peft_model(tm, _lora_config())
    pv = peft.get_peft_model(vk, _lora_config())
    pv.load_state_dict(pt.state_dict())
    return pt, pv.to(device), x


@pytest.mark.parametrize("backend", ["eager", "triton"])
def test_peft_lora_matches_timm_and_stays_fused(backend, monkeypatch):
    device = _backend(backend)
    depth = 1  # the Triton interpreter runs every GEMM of the LoRA terms: one block covers them
    pt, pv, x = _lora_pair(device, depth)
    vk = pv.base_model.model
    vk.backend = backend
    assert all(blk._current_plan().qkv == "lora" and blk._current_plan().fc2 == "lora" for blk in vk.blocks)

    log = _OpLog(monkeypatch)
    ours = pv(x.to(device))
    # No LoRA or torch module inside the blocks was called: the fused path with the low-rank
    # terms. Per block: qkv and fc1 add an ln_linear onto A and a rank-r B GEMM; proj and fc2 add
    # the A and B GEMMs next to their base linear.
    assert dict(log.modules) == {"Linear": 1}, dict(log.modules)  # the head, a module in timm too
    assert log.ops["ln_linear"] == 4 * depth and log.ops["linear"] == 8 * depth, dict(log.ops)
    assert log.ops["attention"] == depth
    log.clear()
    theirs = pt(x)
    assert log.modules["peft.Linear"] == 4 * depth  # timm's: called as modules
    assert_max_diff(ours.cpu(), theirs, TOL)
    ours.square().sum().backward()
    theirs.square().sum().backward()
    lora_grads = {n: p.grad for n, p in pt.named_parameters() if p.requires_grad}
    assert len(lora_grads) == 2 * 4 * depth and all("lora_" in n for n in lora_grads)
    for name, p in pv.named_parameters():
        if name in lora_grads:
            assert p.grad is not None, name
            assert_max_diff(p.grad.cpu(), lora_grads[name], TOL, name)
        else:
            assert p.grad is None, f"{name} is frozen by PEFT"

    # merge_and_unload: plain nn.Linear again, fully fused, same logits as timm's merged model.
    merged_t, merged_v = pt.merge_and_unload(), pv.merge_and_unload()
    assert type(merged_v.blocks[0].attn.qkv) is nn.Linear
    log.clear()
    with torch.no_grad():
        ours = merged_v(x.to(device))
    assert dict(log.ops) == {"patch_embed": 1, "ln_linear": 2 * depth, "attention": depth, "linear": 2 * depth,
                             "layer_norm": 1}
    assert dict(log.modules) == {"Linear": 1}
    with torch.no_grad():
        assert_max_diff(ours.cpu(), merged_t(x), TOL)


def test_lora_states_peft_can_switch(monkeypatch):
    """Disabled adapters, a second active adapter and a dropout adapter all equal timm's."""
    pt, pv, x = _lora_pair("cpu")
    with torch.no_grad():
        with pt.disable_adapter(), pv.disable_adapter():
            assert_max_diff(pv(x), pt(x), TOL)
        for model in (pt, pv):
            torch.manual_seed(1)
            model.add_adapter("second", peft.LoraConfig(r=2, target_modules=["mlp.fc1"], init_lora_weights=False))
        pv.load_state_dict(pt.state_dict())
        for model in (pt, pv):
            model.base_model.set_adapter(["default", "second"])
        assert_max_diff(pv(x), pt(x), TOL)
        for model in (pt, pv):
            torch.manual_seed(2)
            model.add_adapter("dropped", peft.LoraConfig(r=2, target_modules=["attn.qkv"], lora_dropout=0.5))
            model.set_adapter("dropped")
        pv.load_state_dict(pt.state_dict())
        pt.eval()
        pv.eval()  # dropout inactive: still fused; in training PEFT's own forward runs
        assert_max_diff(pv(x), pt(x), TOL)
        log = _OpLog(monkeypatch)
        pv.train()
        torch.manual_seed(3)
        pv(x)
        assert log.modules["peft.Linear"] == TINY["depth"]  # the dropout layers, as modules


# --------------------------------------------------------------------------------------------
# Hooks, swaps, parametrizations


HOOKED = ["patch_embed", "patch_embed.proj", "pos_drop", "blocks.0", "blocks.0.norm1", "blocks.0.attn", "blocks.0.attn.qkv",
          "blocks.0.attn.proj", "blocks.0.ls1", "blocks.0.norm2", "blocks.0.mlp", "blocks.0.mlp.fc1", "blocks.0.mlp.act",
          "blocks.0.mlp.fc2", "blocks.1.attn.q_norm", "blocks.1.mlp.norm", "blocks.1.ls2", "norm", "head"]


def test_forward_hooks_fire_with_timms_tensors(monkeypatch):
    tm, vk = _pair()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        vk(x)
    seen = {"timm": {}, "vitkern": {}}
    handles = []
    for which, model in (("timm", tm), ("vitkern", vk)):
        for name in HOOKED:
            def hook(module, args, out, name=name, which=which):
                seen[which][name] = (args[0].detach().clone(), out.detach().clone())
            handles.append(model.get_submodule(name).register_forward_hook(hook))
    with torch.no_grad():
        assert_max_diff(vk(x), tm(x), TOL)
    assert sorted(seen["vitkern"]) == sorted(seen["timm"]) == sorted(HOOKED)
    for name in HOOKED:
        for what, ours, theirs in zip(("input", "output"), seen["vitkern"][name], seen["timm"][name]):
            assert ours.shape == theirs.shape, f"{name} {what}: {tuple(ours.shape)} vs {tuple(theirs.shape)}"
            assert_max_diff(ours, theirs, TOL, f"{name} {what}")
    for handle in handles:
        handle.remove()
    log = _OpLog(monkeypatch)
    with torch.no_grad():
        vk(x)
    assert dict(log.modules) == {"Linear": 1}, "removing the hooks brings the fused path back"


def test_patch_embed_hook_under_dynamic_img_size_sees_timms_nhwc_tokens():
    tm, vk = _pair(dynamic_img_size=True)
    x = torch.randn(2, 3, 32, 40)
    seen = {}
    for which, model in (("timm", tm), ("vitkern", vk)):
        model.patch_embed.register_forward_hook(lambda m, a, out, which=which: seen.__setitem__(which, out))
    with torch.no_grad():
        assert_max_diff(vk(x), tm(x), TOL)
    assert seen["vitkern"].shape == seen["timm"].shape == (2, 4, 5, 32)
    assert_max_diff(seen["vitkern"], seen["timm"], TOL)


def test_pre_hook_and_backward_hook_change_results_as_in_timm():
    tm, vk = _pair()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        vk(x)
    grads = {}
    for which, model in (("timm", tm), ("vitkern", vk)):
        # tanh, not a scale or shift: LayerNorm's output does not change under those, so a skipped
        # pre-hook on a norm would go unseen.
        model.blocks[1].norm2.register_forward_pre_hook(lambda m, args: (args[0].tanh(),))
        model.blocks[0].attn.proj.register_forward_hook(lambda m, args, out: out.tanh())
        model.blocks[0].mlp.fc1.register_full_backward_hook(
            lambda m, gin, gout, which=which: grads.__setitem__(which, gout[0].detach().clone()))
    ours, theirs = vk(x), tm(x)
    assert_max_diff(ours, theirs, TOL)
    ours.square().sum().backward()
    theirs.square().sum().backward()
    assert_max_diff(grads["vitkern"], grads["timm"], TOL)
    for (name, p), q in zip(vk.named_parameters(), tm.parameters()):
        assert _grad_close(p.grad, q.grad), name


class _ScaledMlp(nn.Module):
    """A user's MLP: timm's Mlp computation, scaled, counting its calls."""

    def __init__(self, mlp):
        super().__init__()
        self.fc1, self.fc2, self.calls = mlp.fc1, mlp.fc2, 0

    def forward(self, x):
        self.calls += 1
        return 0.5 * self.fc2(nn.functional.relu(self.fc1(x)))


def test_swapped_mlp_and_modules_are_called():
    tm, vk = _pair()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        vk(x)
        for model in (tm, vk):
            model.blocks[1].mlp = _ScaledMlp(model.blocks[1].mlp)
            model.blocks[0].norm1 = nn.LayerNorm(32, eps=1e-3)  # a fresh module of another eps
            model.blocks[0].attn.q_norm = nn.LayerNorm(16)
            model.patch_embed.proj = nn.Conv2d(3, 32, 8, 8, padding=0, bias=False)
            model.norm = nn.Identity()
            model.blocks[0].mlp.act = nn.ReLU()
        vk.load_state_dict(tm.state_dict())
        ours, theirs = vk(x), tm(x)
    assert vk.blocks[1].mlp.calls == 1
    assert_max_diff(ours, theirs, TOL)


def test_parametrized_weight_and_subclass_are_honoured():
    from torch.nn.utils import parametrize

    class Doubled(nn.Module):
        def forward(self, w):
            return 2 * w

    class MyLayerNorm(nn.LayerNorm):
        def forward(self, x):
            return super().forward(x) + 1.0

    tm, vk = _pair()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        vk(x)
        for model in (tm, vk):
            parametrize.register_parametrization(model.blocks[0].mlp.fc2, "weight", Doubled())
            norm = MyLayerNorm(32, eps=1e-6)
            norm.load_state_dict(model.blocks[1].norm1.state_dict())
            model.blocks[1].norm1 = norm
        assert_max_diff(vk(x), tm(x), TOL)


def test_global_module_hook_sees_timms_calls():
    tm, vk = _pair()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        vk(x)
    names = {}
    for which, model in (("timm", tm), ("vitkern", vk)):
        lookup = {id(m): n for n, m in model.named_modules()}
        names[which] = []
        handle = nn.modules.module.register_module_forward_hook(
            lambda m, args, out: names[which].append(lookup.get(id(m))))
        with torch.no_grad():
            model(x)
        handle.remove()
    linears = lambda which: [n for n in names[which] if n and n.endswith(("qkv", "proj", "fc1", "fc2", "norm1", "norm2"))]
    assert linears("vitkern") == linears("timm") and len(linears("timm")) == 6 * TINY["depth"] + 1


# --------------------------------------------------------------------------------------------
# The plan is never stale: settings changed after a forward, a model pickled into a new process


def _unfused(model, x):
    """model.forward_features(x) with every sub-module called (a global hook turns fusion off): the oracle."""
    handle = nn.modules.module.register_module_forward_hook(lambda m, args, out: None)
    try:
        torch.manual_seed(1)
        return model.forward_features(x)
    finally:
        handle.remove()


def _set(path, value):
    """A mutation: model.<path> = value (path dotted from the model)."""
    def apply(model):
        *parents, leaf = path.split(".")
        owner = model
        for name in parents:
            owner = getattr(owner, name)
        setattr(owner, leaf, value() if callable(value) else value)
    return apply


# (id, ViT options, train mode, mutation): every setting of a fused module the fused path uses.
SETTING_CHANGES = [
    ("gelu-to-tanh", {}, False, _set("blocks.0.mlp.act.approximate", "tanh")),
    ("tanh-to-gelu", {"act_layer": "gelu_tanh"}, False, _set("blocks.1.mlp.act.approximate", "none")),
    ("norm1-eps", {}, False, _set("blocks.0.norm1.eps", 0.5)),
    ("norm2-eps", {}, False, _set("blocks.1.norm2.eps", 0.5)),
    ("q-norm-eps", {"qk_norm": True}, False, _set("blocks.0.attn.q_norm.eps", 0.5)),
    ("norm1-weight-none", {}, False, _set("blocks.0.norm1.weight", None)),
    ("scale", {}, False, _set("blocks.0.attn.scale", 0.9)),
    ("layer-scale-gamma", {"init_values": 1e-5}, False, _set("blocks.0.ls2.gamma", lambda: nn.Parameter(torch.ones(32)))),
    ("fc1-weight", {}, False, _set("blocks.0.mlp.fc1.weight", lambda: nn.Parameter(torch.randn(64, 32)))),
    ("proj-drop-p", {}, True, _set("blocks.0.attn.proj_drop.p", 0.5)),
    ("mlp-drop1-p", {}, True, _set("blocks.1.mlp.drop1.p", 0.5)),
    ("mlp-drop2-p", {}, True, _set("blocks.1.mlp.drop2.p", 0.5)),
    ("drop-path", {}, True, _set("blocks.0.drop_path2.drop_prob", 0.5)),
    ("attn-drop", {}, True, _set("blocks.0.attn.attn_drop", 0.5)),
    ("train-mode", {"proj_drop_rate": 0.5}, False, lambda model: model.train()),
]


@pytest.mark.parametrize("options,train,mutate", [c[1:] for c in SETTING_CHANGES], ids=[c[0] for c in SETTING_CHANGES])
def test_fused_path_follows_a_setting_changed_after_a_forward(options, train, mutate):
    # Features, not logits: the head starts at zero, which would hide any change in the blocks. And
    # unit-scale weights: with timm's init (std 0.02) every pre-activation is so small that tanh and
    # erf GELU agree to 1e-6, below the rounding bound.
    model = vitkern.ViT(**{**TINY, **options}, mlp_ratio=2.0, backend="eager").train(train)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * (p.shape[-1] ** -0.5 if p.dim() > 1 else 0.5) + (p.dim() == 1))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        model.forward_features(x)  # the plan is cached now
        assert all(blk._plan is not None for blk in model.blocks)
        mutate(model)
        torch.manual_seed(1)
        fused = model.forward_features(x)
        want = _unfused(model, x)
    # The two paths differ only in rounding: fp32 GEMMs of at most K = 64 terms, each term's error
    # bounded by K eps relative to the output's magnitude.
    bound = 64 * torch.finfo(torch.float32).eps * max(1.0, want.abs().max().item())
    assert _max_diff(fused, want) <= bound


_LOAD_IN_NEW_PROCESS = r"""
import sys
import torch
from torch.utils.hooks import RemovableHandle
import vitkern
from vitkern import fusion

path, next_id, swaps = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
model = torch.load(path, weights_only=False)
# Counters restart in every process: this one's may land exactly where the saving process's were.
fusion._SWAPS[0] = swaps
RemovableHandle.next_id = next_id - 1
fired = []
model.blocks[0].mlp.fc1.register_forward_hook(lambda module, args, out: fired.append(tuple(out.shape)))
with torch.no_grad():
    model(torch.randn(1, 3, 32, 32))
print("fired", len(fired))
"""


def test_model_pickled_with_a_plan_fires_a_hook_registered_in_a_new_process(tmp_path):
    import os
    import subprocess
    import sys

    from torch.utils.hooks import RemovableHandle

    from vitkern import fusion

    model = vitkern.ViT(**TINY, backend="eager").eval()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        model.blocks[0].mlp.fc1.register_forward_hook(lambda *args: None).remove()
        model(x)  # a fused plan, cached under this process's counters
    assert all(blk._plan is not None for blk in model.blocks)
    next_id, swaps = RemovableHandle.next_id, fusion._SWAPS[0]
    torch.save(model, tmp_path / "model.pt")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": root}
    done = subprocess.run([sys.executable, "-c", _LOAD_IN_NEW_PROCESS, str(tmp_path / "model.pt"), str(next_id),
                           str(swaps)], capture_output=True, text=True, cwd=root, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "fired 1" in done.stdout, done.stdout


# --------------------------------------------------------------------------------------------
# torch.fx, empty batch, torch.compile


def test_create_feature_extractor_matches_timm_forward_and_backward():
    from torchvision.models.feature_extraction import create_feature_extractor

    tm, vk = _pair()
    nodes = {"blocks.0": "b0", "blocks.1": "b1"}
    fe = create_feature_extractor(vk, return_nodes=nodes)
    x = torch.randn(2, 3, 32, 32)
    theirs = {}
    for i in range(TINY["depth"]):
        tm.blocks[i].register_forward_hook(lambda m, a, out, i=i: theirs.__setitem__(f"b{i}", out))
    tm(x)
    ours = fe(x)
    assert sorted(ours) == ["b0", "b1"]
    for key in ours:
        assert_max_diff(ours[key], theirs[key], TOL, key)
    ours["b1"].square().sum().backward()
    theirs["b1"].square().sum().backward()
    for (name, p), (tname, q) in zip(vk.named_parameters(), tm.named_parameters()):
        if name.startswith(("norm.", "head.")):
            continue  # not on the path to blocks.1
        assert p.grad is not None, name
        assert _grad_close(p.grad, q.grad), name
    with pytest.raises(ValueError, match=r"img_size=\(32, 32\), got \(40, 32\)"):
        fe(torch.randn(1, 3, 40, 32))  # the traced module still validates


@pytest.mark.parametrize("backend", ["eager", "triton", "cuda"])
def test_empty_batch_forward_and_backward(backend, monkeypatch):
    dtype = torch.float32
    if backend == "cuda":
        from test_cuda_ops import _use_emulated_extension

        device, dtype = _use_emulated_extension(monkeypatch), torch.bfloat16  # the emulator: CPU tensors
    else:
        device = _backend(backend)
    tm, vk = _pair()
    vk = vk.to(device=device, dtype=dtype)
    vk.backend = backend
    x = torch.randn(0, 3, 32, 32, device=device, dtype=dtype, requires_grad=True)
    out = vk(x)
    expected = tm(torch.randn(0, 3, 32, 32))
    assert out.shape == expected.shape == (0, TINY["num_classes"]) and out.dtype == dtype
    out.sum().backward()
    assert x.grad is not None and x.grad.shape == x.shape
    for name, p in vk.named_parameters():
        assert p.grad is not None and p.grad.dtype == dtype and not p.grad.any(), name
    features = vk.forward_features(x.detach())
    assert features.shape == (0, 17, TINY["embed_dim"])


def test_compile_fullgraph_with_lora_and_hooks():
    pt, pv, x = _lora_pair("cpu", depth=1)
    vk = pv.base_model.model
    with torch.no_grad():
        expected = vk(x)
    torch._dynamo.reset()
    compiled = torch.compile(vk, backend="eager", fullgraph=True)
    with torch.no_grad():
        assert_max_diff(compiled(x), expected, 1e-6)
        seen = []
        vk.blocks[0].attn.qkv.register_forward_hook(lambda m, a, out: seen.append(out))
        assert_max_diff(compiled(x), expected, 1e-6)
    assert len(seen) == 1, "a hook registered after compiling fires (dynamo guards on the hooks)"
