"""vitkern.train on 2 ranks (torch.multiprocessing + gloo, CPU): DDP and FSDP2 give the
single-process losses, weights and held-out evaluation for the same global batch, within fp32
rounding; FSDP2's sharded (DCP) checkpoint resumes; a global batch the ranks cannot split is refused.

One spawn runs every 2-rank case (starting processes is the slow part); the single-process
reference runs here."""

from __future__ import annotations

import os
import socket
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from vitkern.train import checkpoint as ckpt
from vitkern.train.metrics import read_metrics
from vitkern.train.recipes import preset

pytestmark = pytest.mark.timeout(300)

TINY = dict(img_size=16, patch_size=8, embed_dim=32, depth=2, num_heads=2, mlp_ratio=2.0, global_batch=16,
            grad_accum=1, warmup_steps=1, steps=5, stop_at=4, eval_every=4, save_every=4, progress=False,
            backend="eager", device="cpu", threads=1, grad_clip=1.0)


def tiny(out, **overrides):
    return preset("digits").replace(out=str(out), **{**TINY, **overrides})


def _worker(rank: int, port: int, root: str) -> None:
    from vitkern.train.loop import train

    try:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
        # grad_accum 2 on 2 ranks: micro-batches of 4, the same 16 images per step as one process.
        train(tiny(os.path.join(root, "ddp"), grad_accum=2))
        train(tiny(os.path.join(root, "fsdp"), parallel="fsdp", stop_at=2, save_every=2))
        train(tiny(os.path.join(root, "fsdp"), parallel="fsdp", resume=True, save_every=2))  # to step 4
        try:
            train(tiny(os.path.join(root, "bad"), global_batch=15))
        except ValueError as exc:
            with open(os.path.join(root, f"error_rank{rank}.txt"), "w") as f:
                f.write(str(exc))
        dist.destroy_process_group()
    except BaseException:
        with open(os.path.join(root, f"crash_rank{rank}.txt"), "w") as f:
            f.write(traceback.format_exc())
        raise


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("dist"))
    try:
        mp.spawn(_worker, args=(_free_port(), root), nprocs=2, join=True)
    except Exception:
        crashes = [open(os.path.join(root, f)).read() for f in sorted(os.listdir(root)) if f.startswith("crash")]
        raise AssertionError("a rank failed:\n" + "\n".join(crashes)) from None
    from vitkern.train.loop import train

    before = torch.get_num_threads()
    try:
        train(tiny(os.path.join(root, "single")))
    finally:
        torch.set_num_threads(before)
    return root


def _final_weights(run_dir: str):
    return ckpt.load_safetensors(os.path.join(ckpt.latest_checkpoint(run_dir), "model.safetensors"))


@pytest.mark.parametrize("kind", ["ddp", "fsdp"])
def test_two_ranks_match_one_process(runs, kind):
    single = read_metrics(os.path.join(runs, "single"))
    multi = read_metrics(os.path.join(runs, kind))
    assert [r["step"] for r in multi] == [1, 2, 3, 4]
    for a, b in zip(single, multi):
        assert b["lr"] == a["lr"]
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5, abs=1e-6)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-4)
    # The held-out evaluation at step 4: 297 images split 149 + 148 (one stand-in not counted).
    assert multi[-1]["eval_loss"] == pytest.approx(single[-1]["eval_loss"], rel=1e-5)
    assert multi[-1]["eval_accuracy"] == pytest.approx(single[-1]["eval_accuracy"], abs=1.5 / 297)
    want, got = _final_weights(os.path.join(runs, "single")), _final_weights(os.path.join(runs, kind))
    assert want.keys() == got.keys()
    for k in want:
        torch.testing.assert_close(got[k], want[k], atol=2e-5, rtol=1e-4, msg=lambda m: f"{kind} {k}: {m}")


def test_fsdp_checkpoint_is_sharded_dcp(runs):
    # The run stopped at step 2 and resumed from that checkpoint's sharded (DCP) state to step 4;
    # its final weights matched one process above. Each checkpoint holds dcp/ and every rank's RNG;
    # full safetensors weights are gathered for a run's last checkpoint only.
    root = os.path.join(runs, "fsdp", "checkpoints")
    assert sorted(os.listdir(root)) == ["step_0000002", "step_0000004"]
    for step in ("step_0000002", "step_0000004"):
        files = os.listdir(os.path.join(root, step))
        assert {"dcp", "rng_rank0.pt", "rng_rank1.pt", "train_state.pt", "model.safetensors"} <= set(files)
    state = torch.load(os.path.join(root, "step_0000002", "train_state.pt"), weights_only=False)
    assert "optimizer" not in state  # the optimizer state lives sharded in dcp/


def test_batch_not_divisible_by_ranks(runs):
    for rank in (0, 1):
        with open(os.path.join(runs, f"error_rank{rank}.txt")) as f:
            assert "--global-batch 15 is not divisible by the number of ranks (2)" in f.read()
