"""vitkern.train in one process: the digits run's outputs, bit-for-bit resume, bad input, masked
patch prediction and the Triton backend. Tiny models and a handful of steps: seconds each."""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil

import pytest
import torch
from conftest import INTERPRETING, TRITON_DEVICE

import vitkern
from vitkern.train import checkpoint as ckpt
from vitkern.train.cli import main
from vitkern.train.loop import NothingToDo, train
from vitkern.train.metrics import read_metrics
from vitkern.train.mpp import MaskedPatchPrediction, corruption_plan, mpp_targets
from vitkern.train.recipes import RecipeNote, preset

pytestmark = pytest.mark.timeout(300)

# A 2-block ViT (dim 32) on 16x16 digits, patch 8: 4 patches + the class token.
TINY = dict(img_size=16, patch_size=8, embed_dim=32, depth=2, num_heads=2, mlp_ratio=2.0, global_batch=16,
            warmup_steps=2, eval_every=1000, save_every=3, progress=False, backend="eager", device="cpu", threads=1)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # Tiny matmuls gain nothing from threads, and on a busy CI machine spinning OpenMP threads
    # slow them down a hundredfold; the runs below set torch's thread count (restored here).
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def tiny(out, **overrides):
    return preset("digits").replace(out=str(out), **{**TINY, **overrides})


def vit_from(recipe, num_classes=10):
    return vitkern.ViT(img_size=recipe.img_size, patch_size=recipe.patch_size, embed_dim=recipe.embed_dim,
                       depth=recipe.depth, num_heads=recipe.num_heads, mlp_ratio=recipe.mlp_ratio,
                       num_classes=num_classes, backend="eager")


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    """6 uninterrupted steps (checkpoints at 3 and 6, held-out evaluation at the end), with
    dropout before the head so that resuming must restore the global RNG too."""
    out = tmp_path_factory.mktemp("full")
    recipe = tiny(out, steps=6, drop_rate=0.2)
    return recipe, train(recipe)


def test_digits_run_writes_csv_png_summary_and_loadable_checkpoint(full_run):
    recipe, summary = full_run
    out = recipe.out
    rows = read_metrics(out)
    with open(os.path.join(out, "metrics.csv")) as f:
        header = f.readline().strip().split(",")
    for column in ("step", "loss", "lr", "img_per_s", "mfu", "peak_mem_mb", "eval_accuracy"):
        assert column in header
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    assert all(math.isfinite(r["loss"]) and r["img_per_s"] > 0 and r["mfu"] > 0 for r in rows)
    assert rows[0]["lr"] == pytest.approx(recipe.lr / 2)  # warm-up 1/2, 2/2, then linear decay
    assert rows[-1]["eval_accuracy"] is not None
    with open(os.path.join(out, "metrics.jsonl")) as f:
        assert [json.loads(line)["loss"] for line in f] == [r["loss"] for r in rows]
    with open(os.path.join(out, "summary.json")) as f:
        saved = json.load(f)
    assert saved["final_loss"] == pytest.approx(rows[-1]["loss"])
    assert 0.0 <= saved["eval_accuracy"] <= 1.0
    assert saved["tpuv3_core_days_equivalent"] > 0
    with open(os.path.join(out, "curves.png"), "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert [os.path.basename(p) for p in ckpt.list_checkpoints(out)] == ["step_0000003", "step_0000006"]
    # The weights are the ViT's own state_dict: a fresh model loads them strictly and reproduces
    # the held-out accuracy the run reported.
    model = vit_from(recipe)
    model.load_state_dict(ckpt.load_safetensors(os.path.join(out, "checkpoints", "step_0000006", "model.safetensors")))
    from vitkern.train.data import DigitsDataset

    test = DigitsDataset("test", recipe.img_size)
    with torch.no_grad():
        acc = (model.eval()(test.images).argmax(-1) == test.labels).float().mean().item()
    assert acc == pytest.approx(saved["eval_accuracy"], abs=1e-6)


def test_stop_and_resume_replays_the_uninterrupted_run_bit_for_bit(full_run, tmp_path):
    recipe, _ = full_run
    first = tiny(tmp_path, steps=6, stop_at=3, drop_rate=0.2)
    summary = train(first)
    assert summary["steps_done"] == 3 and summary["stopped_early"]
    train(tiny(tmp_path, steps=6, resume=True, drop_rate=0.2))
    want, got = read_metrics(recipe.out), read_metrics(str(tmp_path))
    for column in ("loss", "lr", "grad_norm"):
        assert [r[column] for r in got] == [r[column] for r in want], column
    a = ckpt.load_safetensors(os.path.join(recipe.out, "checkpoints", "step_0000006", "model.safetensors"))
    b = ckpt.load_safetensors(os.path.join(str(tmp_path), "checkpoints", "step_0000006", "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_checkpoint_is_written_atomically(tmp_path):
    ckpt.save(str(tmp_path), 1, rank=0, weights={"w": torch.ones(2)}, extra_weights=None, train_state={"step": 1},
              meta={}, keep=2)
    # A run killed mid-save leaves only a .tmp directory: it is never taken for a checkpoint.
    os.makedirs(os.path.join(ckpt.checkpoint_root(str(tmp_path)), ".step_0000002.tmp"))
    assert ckpt.latest_checkpoint(str(tmp_path)).endswith("step_0000001")
    for step in (2, 3, 4):
        ckpt.save(str(tmp_path), step, rank=0, weights={"w": torch.ones(2)}, extra_weights=None,
                  train_state={"step": step}, meta={}, keep=2)
    assert [os.path.basename(p) for p in ckpt.list_checkpoints(str(tmp_path))] == ["step_0000003", "step_0000004"]


# --------------------------------------------------------------------------------------------
# Bad input: errors that name the flag


def test_missing_or_empty_data_folder(tmp_path):
    with pytest.raises(ValueError, match="--data: .*not a directory"):
        train(tiny(tmp_path / "out", data=str(tmp_path / "nope")))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="--data: .*no class sub-folders"):
        train(tiny(tmp_path / "out", data=str(tmp_path / "empty")))
    (tmp_path / "empty" / "cat").mkdir()
    with pytest.raises(ValueError, match="--data: .*no image files"):
        train(tiny(tmp_path / "out", data=str(tmp_path / "empty")))


def test_unreadable_image_is_skipped_and_counted(tmp_path):
    from PIL import Image

    root = tmp_path / "images"
    g = torch.Generator().manual_seed(0)
    for cls in ("a", "b"):
        (root / cls).mkdir(parents=True)
        for i in range(2):
            pixels = (torch.rand(20, 24, 3, generator=g) * 255).to(torch.uint8).numpy()
            Image.fromarray(pixels).save(root / cls / f"{i}.png")
    (root / "b" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    recipe = tiny(tmp_path / "out", data=str(root), val_data=str(root), global_batch=5, steps=2, num_workers=1)
    summary = train(recipe)
    # One epoch = the 5 files; the broken one is in every batch, replaced and counted each step.
    assert summary["skipped_images"] == 2
    assert [r["skipped_images"] for r in read_metrics(recipe.out)] == [1, 1]
    assert summary["eval_accuracy"] is not None and math.isfinite(summary["final_loss"])


def test_batch_not_divisible(tmp_path):
    expected = "--global-batch 16 is not divisible by the number of ranks \\(1\\) x --grad-accum \\(3\\)"
    with pytest.raises(ValueError, match=expected):
        train(tiny(tmp_path, grad_accum=3))


def test_checkpoint_from_another_model(full_run, tmp_path):
    recipe, _ = full_run
    expected = "--resume: the checkpoint .* another model:\n  embed_dim: checkpoint 32, this run 48"
    with pytest.raises(ValueError, match=expected):
        train(tiny(recipe.out, embed_dim=48, steps=6, resume=True, drop_rate=0.2))
    with pytest.raises(ValueError, match="--init: the weights .* from another model"):
        train(tiny(tmp_path, embed_dim=48, steps=1, warmup_steps=1, init=recipe.out))
    with pytest.raises(ValueError, match="--resume: no checkpoint in --out"):
        train(tiny(tmp_path / "fresh", resume=True))


def test_init_refuses_weights_the_model_has_no_place_for(full_run, tmp_path):
    recipe, _ = full_run
    state = ckpt.load_safetensors(os.path.join(recipe.out, "checkpoints", "step_0000006", "model.safetensors"))
    state["blocks.9.mlp.fc1.weight"] = torch.zeros(2, 2)  # a deeper model's layer
    ckpt.save_safetensors(state, str(tmp_path / "deeper.safetensors"))
    with pytest.raises(ValueError, match=r"--init: .* from another model: missing \[\], "
                                         r"unexpected \['blocks\.9\.mlp\.fc1\.weight'\]"):
        train(tiny(tmp_path / "out", steps=1, warmup_steps=1, init=str(tmp_path / "deeper.safetensors")))


def test_cli_reports_bad_flags(capsys):
    assert main(["--steps", "0"]) == 2
    assert "--steps must be a positive int, got 0" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # argparse: "invalid choice"
        main(["--objective", "mae"])
    assert "--objective: invalid choice: 'mae'" in capsys.readouterr().err
    assert main(["--preset", "finetune", "--lr", "0.03", "--print-recipe"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["lr"] == 0.03 and printed["optimizer"] == "sgd" and printed["global_batch"] == 512


def test_paper_recipes():
    pre, ft, mpp = preset("pretrain"), preset("finetune"), preset("mpp")
    assert (pre.optimizer, pre.betas, pre.weight_decay, pre.warmup_steps, pre.schedule, pre.global_batch) == (
        "adam", (0.9, 0.999), 0.1, 10_000, "linear", 4096)
    assert pre.representation_size == 768
    assert (ft.optimizer, ft.momentum, ft.weight_decay, ft.grad_clip, ft.global_batch, ft.schedule, ft.new_head) == (
        "sgd", 0.9, 0.0, 1.0, 512, "cosine", True)
    assert ft.img_size == 384 and ft.representation_size is None
    assert (mpp.objective, mpp.mpp_corrupt, mpp.mpp_mask, mpp.mpp_random, mpp.mpp_bits, mpp.lr) == (
        "mpp", 0.5, 0.8, 0.1, 3, 2e-4)


# --------------------------------------------------------------------------------------------
# Masked patch prediction


def test_mpp_targets_of_a_hand_made_image():
    pixels = torch.zeros(3, 16, 16)
    pixels[0, :8, :8] = 1.0  # top-left: pure red -> levels (7, 0, 0)
    pixels[:, :8, 8:] = 0.3  # top-right: gray 0.3 -> floor(2.4) = 2 per channel
    pixels[:, 8:12, :8] = 1.0  # bottom-left: half white, half black -> mean 0.5 -> 4
    pixels[1, 8:, 8:] = 0.99  # bottom-right: (0, 0.99, 0.13) -> (0, 7, 1)
    pixels[2, 8:, 8:] = 0.13
    image = (pixels - 0.5) / 0.5  # as the model sees it
    got = mpp_targets(image[None], 8, (0.5,) * 3, (0.5,) * 3)
    assert got.tolist() == [[7 * 64, 2 * 64 + 2 * 8 + 2, 4 * 64 + 4 * 8 + 4, 0 * 64 + 7 * 8 + 1]]
    assert mpp_targets(torch.ones(1, 3, 8, 8), 8, (0.5,) * 3, (0.5,) * 3).item() == 511  # white: top level


def test_mpp_corruption_proportions():
    g = torch.Generator().manual_seed(1)
    corrupted, masked, replaced = corruption_plan(400, 196, 0.5, 0.8, 0.1, g)
    n = corrupted.numel()
    c = corrupted.sum().item()
    # Within 4 standard deviations of the binomial counts.
    assert abs(c / n - 0.5) < 4 * math.sqrt(0.25 / n)
    assert abs(masked.sum().item() / c - 0.8) < 4 * math.sqrt(0.16 / c)
    assert abs(replaced.sum().item() / c - 0.1) < 4 * math.sqrt(0.09 / c)
    assert not (masked & replaced).any() and not ((masked | replaced) & ~corrupted).any()

    vit = vitkern.ViT(img_size=16, patch_size=4, embed_dim=8, depth=1, num_heads=2, num_classes=0, backend="eager")
    mpp = MaskedPatchPrediction(vit)
    tokens = torch.randn(64, 16, 8)
    out, which = mpp.corrupt_tokens(tokens, torch.Generator().manual_seed(2))
    _, masked, replaced = corruption_plan(64, 16, 0.5, 0.8, 0.1, torch.Generator().manual_seed(2))
    assert torch.equal(which, corrupted_of(64, 16, 2))
    assert torch.equal(out[masked], mpp.mask_token.detach()[0].expand(int(masked.sum()), 8))
    kept = ~(masked | replaced)
    assert torch.equal(out[kept], tokens[kept])
    flat = tokens.reshape(-1, 8)
    for row in out[replaced]:  # another patch's embedding, never its own
        match = (flat == row).all(-1).nonzero().flatten().tolist()
        assert match
    own = tokens[replaced]
    assert not (out[replaced] == own).all(-1).any()


def corrupted_of(b, n, seed):
    return corruption_plan(b, n, 0.5, 0.8, 0.1, torch.Generator().manual_seed(seed))[0]


def test_mpp_loss_decreases_then_finetunes_from_the_checkpoint(tmp_path):
    mpp_out = tmp_path / "mpp"
    summary = train(tiny(mpp_out, objective="mpp", steps=12, lr=3e-3, save_every=12))
    losses = [r["loss"] for r in read_metrics(str(mpp_out))]
    assert losses[0] == pytest.approx(math.log(512), rel=0.05)  # uniform over 512 colours at init
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.5  # nats: the colour marginal alone is learned fast
    assert summary["eval_accuracy"] is not None  # colour accuracy on held-out corrupted patches
    assert os.path.exists(os.path.join(summary["checkpoint"], "mpp.safetensors"))
    # Fine-tune with the classification recipe at a higher resolution (patch grid 2x2 -> 3x3):
    # the pos-embed is resampled and the new head is zero, so the first loss is exactly ln(10).
    ft = preset("digits-finetune").replace(out=str(tmp_path / "ft"), init=str(mpp_out),
                                           **{**TINY, "img_size": 24, "steps": 3, "warmup_steps": 1})
    train(ft)
    rows = read_metrics(str(tmp_path / "ft"))
    assert rows[0]["loss"] == pytest.approx(math.log(10), abs=1e-6)
    weights = ckpt.load_safetensors(os.path.join(ckpt.latest_checkpoint(str(tmp_path / "ft")), "model.safetensors"))
    assert weights["pos_embed"].shape == (1, 1 + 9, 32)


# --------------------------------------------------------------------------------------------
# The Triton backend trains like eager


@pytest.mark.skipif(TRITON_DEVICE != "cpu" or not INTERPRETING,
                    reason="CPU interpreter check (the GPU suite runs the real kernels)")
def test_triton_backend_trains_with_eager_losses(tmp_path):
    # --stop-at before --steps: two steps and no held-out evaluation (the interpreter is slow).
    common = dict(depth=1, global_batch=4, steps=3, stop_at=2, save_every=3)
    train(tiny(tmp_path / "eager", **common))
    train(tiny(tmp_path / "triton", backend="triton", **common))
    eager, triton = read_metrics(str(tmp_path / "eager")), read_metrics(str(tmp_path / "triton"))
    for e, t in zip(eager, triton):
        assert t["loss"] == pytest.approx(e["loss"], rel=2e-5, abs=2e-5)
        assert t["grad_norm"] == pytest.approx(e["grad_norm"], rel=1e-4)


def test_bf16_master_weights_checkpointing_and_accumulation_train_like_fp32(tmp_path):
    # bf16 parameters with fp32 master copies (what CUDA runs by default), activation
    # checkpointing and 2 accumulated micro-batches: the losses follow the fp32 run to bf16 rounding.
    common = dict(steps=3, stop_at=2, grad_accum=2)
    train(tiny(tmp_path / "fp32", **common))
    train(tiny(tmp_path / "bf16", precision="bf16", grad_checkpointing=True, **common))
    fp32, bf16 = read_metrics(str(tmp_path / "fp32")), read_metrics(str(tmp_path / "bf16"))
    for a, b in zip(fp32, bf16):
        assert b["loss"] == pytest.approx(a["loss"], rel=2e-2)
    weights = ckpt.load_safetensors(os.path.join(ckpt.latest_checkpoint(str(tmp_path / "bf16")), "model.safetensors"))
    assert all(w.dtype == torch.float32 for w in weights.values())  # the masters are saved, not bf16 copies


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_amp_trains_like_fp32_under_autocast(tmp_path, amp):
    # --amp: torch.autocast over fp32 weights (fp16 with a GradScaler): the losses follow the fp32
    # run to the autocast dtype's rounding, and the checkpointed weights are the fp32 parameters.
    common = dict(steps=3, stop_at=2)
    train(tiny(tmp_path / "fp32", **common))
    summary = train(tiny(tmp_path / amp, amp=amp, **common))
    fp32, mixed = read_metrics(str(tmp_path / "fp32")), read_metrics(str(tmp_path / amp))
    assert len(mixed) == len(fp32) == 2
    # The first step's loss is the same weights' in both runs. With fp16 the GradScaler's first
    # scale (2^16) overflows this model's gradients: that step is skipped (its norm reads inf) and
    # the runs part ways, as timm's --amp runs do (test_autocast.py compares those with timm's).
    assert mixed[0]["loss"] == pytest.approx(fp32[0]["loss"], rel=2e-2)
    if amp == "bf16":
        assert mixed[1]["loss"] == pytest.approx(fp32[1]["loss"], rel=2e-2)
    assert all(math.isfinite(m["loss"]) for m in mixed)
    assert summary["amp"] == amp and summary["compute_dtype"] == "float32"
    weights = ckpt.load_safetensors(os.path.join(ckpt.latest_checkpoint(str(tmp_path / amp)), "model.safetensors"))
    assert all(w.dtype == torch.float32 for w in weights.values())


def test_amp_refuses_bf16_weights_and_unknown_dtypes(tmp_path):
    with pytest.raises(ValueError, match="--amp bf16 runs torch.autocast over fp32 weights"):
        tiny(tmp_path, amp="bf16", precision="bf16-weights")
    with pytest.raises(ValueError, match="--amp must be one of"):
        tiny(tmp_path, amp="int8")
    assert not os.listdir(tmp_path)


def test_digits_arrays_are_scikit_learns():
    from sklearn.datasets import load_digits

    from vitkern.train.data import load_digits_arrays

    images, labels = load_digits_arrays()
    reference = load_digits()
    assert images.shape == (1797, 8, 8) and (images == reference.images).all() and (labels == reference.target).all()


def test_mpp_refuses_vit_options_it_does_not_reproduce():
    for options, message in ((dict(pre_norm=True), "pre_norm"), (dict(no_embed_class=True), "no_embed_class"),
                             (dict(reg_tokens=2), "no other prefix tokens")):
        vit = vitkern.ViT(img_size=16, patch_size=4, embed_dim=8, depth=1, num_heads=2, num_classes=0, **options)
        with pytest.raises(ValueError, match=message):
            MaskedPatchPrediction(vit)


def test_named_model_normalizes_with_its_pretrained_cfg():
    """A named model's data is normalized with its checkpoint's statistics (DeiT: ImageNet's), an
    unnamed one with the paper's 0.5/0.5."""
    from vitkern.train.loop import _named_pretrained_cfg

    assert _named_pretrained_cfg("deit_small_patch16_224")["mean"] == (0.485, 0.456, 0.406)
    assert _named_pretrained_cfg("vit_base_patch16_224")["std"] == (0.5, 0.5, 0.5)
    assert _named_pretrained_cfg(None) == {}


# --------------------------------------------------------------------------------------------
# Runs never lose or hide data: every refused command leaves the files on disk as they were


def tree_state(root):
    """{relative path: sha256 of the file, or "dir"} of everything under `root`."""
    state = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for d in dirnames:
            state[os.path.relpath(os.path.join(dirpath, d), root)] = "dir"
        for f in filenames:
            path = os.path.join(dirpath, f)
            with open(path, "rb") as fh:
                state[os.path.relpath(path, root)] = hashlib.sha256(fh.read()).hexdigest()
    return state


@pytest.fixture
def run_copy(full_run, tmp_path):
    """A private copy of the finished 6-step run (checkpoints at steps 3 and 6)."""
    recipe, _ = full_run
    out = tmp_path / "run"
    shutil.copytree(recipe.out, out)
    return recipe, str(out)


def _damage(path, how):
    if how == "missing":
        os.remove(path)
    else:
        with open(path, "rb") as f:
            data = f.read()
        with open(path, "wb") as f:
            f.write(data[: len(data) // 2])


@pytest.mark.parametrize("how", ["truncated", "missing"])
@pytest.mark.parametrize("name", ["train_state.pt", "model.safetensors", "rng_rank0.pt"])
def test_damaged_newest_checkpoint_is_named_and_the_previous_one_offered(run_copy, name, how):
    _, out = run_copy
    newest, previous = (os.path.join(out, "checkpoints", f"step_000000{s}") for s in (6, 3))
    _damage(os.path.join(newest, name), how)
    before = tree_state(out)
    with pytest.raises(ValueError) as info:
        train(tiny(out, steps=9, resume=True, drop_rate=0.2))
    message = str(info.value)
    assert message.startswith("--resume: checkpoint") and name in message and newest in message, message
    assert ("missing" if how == "missing" else "truncated") in message, message
    assert f"--resume-from {previous}" in message, message
    assert tree_state(out) == before


def test_resume_from_the_previous_checkpoint_replays_the_run_and_keeps_the_damaged_one(full_run, run_copy):
    recipe, out = run_copy
    newest = os.path.join(out, "checkpoints", "step_0000006")
    _damage(os.path.join(newest, "model.safetensors"), "truncated")
    damaged = tree_state(newest)
    train(tiny(out, steps=6, drop_rate=0.2, resume_from=os.path.join(out, "checkpoints", "step_0000003")))
    # Steps 4-6 replayed from step 3 exactly as the uninterrupted run did them.
    assert [r["loss"] for r in read_metrics(out)] == [r["loss"] for r in read_metrics(recipe.out)]
    a = ckpt.load_safetensors(os.path.join(recipe.out, "checkpoints", "step_0000006", "model.safetensors"))
    b = ckpt.load_safetensors(os.path.join(newest, "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert tree_state(newest + ".abandoned") == damaged  # set aside, not deleted
    with pytest.raises(ValueError, match="--resume-from .* is not a checkpoint of --out"):
        train(tiny(out, steps=9, resume_from=str(recipe.out)))


def test_unusable_out_is_refused_before_model_and_data(tmp_path, monkeypatch):
    import vitkern.train.loop as loop

    def must_not_build(*args, **kwargs):
        raise AssertionError("the data was built before --out was checked")

    monkeypatch.setattr(loop, "build_datasets", must_not_build)
    (tmp_path / "a_file").write_text("not a directory")
    before = tree_state(tmp_path)
    cases = [(tmp_path / "a_file", "is an existing file"), (tmp_path / "a_file" / "run", "is below .*a_file.*a file"),
             ("/proc/vitkern-no-such-dir/run", "is not writable")]  # /proc takes no new entries, even from root
    for out, why in cases:
        with pytest.raises(ValueError, match=f"^--out .*{why}"):
            train(tiny(out, steps=1, warmup_steps=1))
    if os.geteuid() != 0:  # root writes through permission bits
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        before = tree_state(tmp_path)
        with pytest.raises(ValueError, match="^--out .* is not writable"):
            train(tiny(locked / "run", steps=1, warmup_steps=1))
    assert tree_state(tmp_path) == before


def test_resume_of_a_finished_run_says_so_and_writes_nothing(run_copy, capsys):
    _, out = run_copy
    before = tree_state(out)
    with pytest.raises(NothingToDo, match="step 6, where this run ends .*the run is done") as info:
        train(tiny(out, steps=6, resume=True, drop_rate=0.2))
    assert info.value.finished
    with pytest.raises(NothingToDo, match="step 6, past where this run ends \\(--steps 5\\)") as info:
        train(tiny(out, steps=5, resume=True, drop_rate=0.2))
    assert not info.value.finished
    flags = ["--img-size", "16", "--patch-size", "8", "--embed-dim", "32", "--depth", "2", "--num-heads", "2",
             "--global-batch", "16", "--warmup-steps", "2", "--drop-rate", "0.2", "--backend", "eager", "--device",
             "cpu", "--threads", "1", "--no-progress", "--out", out, "--resume"]
    assert main(flags + ["--steps", "6"]) == 0
    assert "the run is done" in capsys.readouterr().err
    assert main(flags + ["--steps", "4"]) == 2
    assert "past where this run ends" in capsys.readouterr().err
    assert tree_state(out) == before


def test_out_with_an_earlier_run_needs_resume_or_overwrite(run_copy):
    _, out = run_copy
    before = tree_state(out)
    with pytest.raises(ValueError, match="^--out .* holds an earlier run \\(checkpoints/step_0000003, .*"
                                         "pass --resume to continue it, --overwrite to replace it"):
        train(tiny(out, steps=3))
    with pytest.raises(ValueError, match="--overwrite .* --resume .* pass one of them"):
        tiny(out, steps=3, resume=True, overwrite=True)
    assert tree_state(out) == before
    summary = train(tiny(out, steps=3, overwrite=True))
    # Only this run's outputs remain: its own checkpoint (not pruned by the earlier run's step 6),
    # its 3 metric rows, a summary pointing at its checkpoint.
    assert [os.path.basename(p) for p in ckpt.list_checkpoints(out)] == ["step_0000003"]
    assert [r["step"] for r in read_metrics(out)] == [1, 2, 3]
    assert summary["checkpoint"] == ckpt.step_dir(out, 3)


def test_short_run_caps_the_recipes_warmup_unless_it_was_given(capsys):
    with pytest.warns(RecipeNote, match="warm-up \\(50 steps\\) is longer than --steps 24: --warmup-steps capped to 24"):
        recipe = preset("digits").replace(steps=24)
    assert (recipe.steps, recipe.warmup_steps) == (24, 24)
    with pytest.raises(ValueError, match="--warmup-steps \\(30\\) must not exceed --steps \\(24\\)"):
        preset("digits").replace(steps=24, warmup_steps=30)
    assert main(["--preset", "digits", "--steps", "24", "--print-recipe"]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out)["warmup_steps"] == 24
    assert "note: the recipe's warm-up (50 steps) is longer than --steps 24" in captured.err


def test_checkpoint_killed_mid_save_leaves_the_previous_one_newest(tmp_path, monkeypatch):
    """A save that fails after writing part of its files (disk full, a kill) must leave no step_*
    directory behind: the previous checkpoint stays the newest and complete."""
    out = str(tmp_path)
    ckpt.save(out, 1, rank=0, weights={"w": torch.ones(2)}, extra_weights=None, train_state={"step": 1}, meta={})

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ckpt, "save_safetensors", disk_full)  # after rng_rank0.pt, before the rest
    with pytest.raises(OSError):
        ckpt.save(out, 2, rank=0, weights={"w": torch.ones(2)}, extra_weights=None, train_state={"step": 2}, meta={})
    assert [os.path.basename(p) for p in ckpt.list_checkpoints(out)] == ["step_0000001"]
    assert sorted(os.listdir(ckpt.latest_checkpoint(out))) == ["meta.json", "model.safetensors", "rng_rank0.pt",
                                                               "train_state.pt"]
