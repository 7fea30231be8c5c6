"""`sslctl pretrain --compile` (slow: two short real runs and the compilation of a ResNet's forward
and backward: the tests' TinyResNet, torchvision's ResNet class with its BasicBlocks, downsample
shortcuts and BN at a quarter of ResNet-18's width and half its depth, so the same kinds of
modules are compiled at a fraction of the cost). Engine._wrap compiles each child of the Method
in place (nn.Module.compile), so a compiled run must compute the same training steps as an eager
one and write the same artifacts.

What compiling could silently break, and what catches it here:
- the arithmetic (a dropped in-place update of BN statistics or of the key encoder's parameters,
  a stale guard on parameters that `momentum_update` changes in place; with Inductor also a wrong
  fusion): the per-step losses must match eager's, BN must have counted the same statistics
  updates, and the exported encoder must compute the same features (eval mode: the running
  statistics count);
- the names (a compiled wrapper stores its module as `_orig_mod.*`): the encoder export must
  load with strict=True into the torchvision model, and the checkpoint must hold eager's keys so
  either kind of run can resume the other.

Two backends. `aot_eager` (always run): Dynamo's capture, its guards and AOTAutograd's
functionalised forward and backward (where in-place updates of buffers and parameters are kept or
lost), the same for every backend; 22 CPU-s on TinyResNet (44 on ResNet-18). `inductor`
(`--compile`'s backend) adds code generation, which is PyTorch's to get right, and costs far more on
a fresh machine: cold, for ResNet-18, 505 CPU-s (6.5 minutes) alone on this session's 2-core Intel
Xeon, ~250 of them Inductor's Python lowering and ~230 g++ building 59 kernels, and in the whole
suite its two g++ processes slowed the other test worker too (2026-11-26; 28 s with Inductor's cache
warm). So it runs only with SSLCTL_TEST_INDUCTOR=1 (passed on that machine that day) and otherwise
shows as skipped.

MoCo v2 covers the most: a momentum key encoder (a child whose parameters are updated outside
the compiled graph), split BN, a queue. fp32 (bf16 and channels_last off), so that the only
difference left is the order of floating-point operations (Inductor fuses and reorders
reductions): see the tolerances below.
"""

from __future__ import annotations

import os

import pytest
import torch

from sslctl import checkpoint as ckpt
from sslctl.encoder_io import load_encoder
from sslctl.methods import build_method
from sslctl.recipes import load_recipe
from sslctl.train import pretrain
from tests.realrun import TINY_RESNET, metrics

pytestmark = pytest.mark.slow

STEPS = 4
OVERRIDES = [f"encoder.name={TINY_RESNET}", "optim.batch_size=16", "method.queue_size=64", "augment.crop_size=28"]
# Tolerances, from measurements here on ResNet-18 (torch 2.14, gcc 12, one thread, 4 steps). A
# compiled run differs from eager only as much as eager differs from itself under another
# summation order (on TinyResNet aot_eager equals eager exactly; one step fewer: 1.6e-1):
#                                  per-step loss   encoder features' change (see below)
#   eager, 2 threads instead of 1      5.8e-6            2.2e-4
#   eager, channels_last               2.9e-5            3.5e-4
#   compiled (Inductor)                6.9e-6            2.1e-4
#   eager, one step fewer (a defect)     -               1.3e-1
# (Weights compared one by one are no use: the BN-normalised gradients of 4 small steps cancel
# so much that any two summation orders move the weights 3-6% differently, with the same features.)
LOSS_TOL = 1e-3
FEATURE_TOL = 1e-2


def compile_unavailable() -> str | None:
    """Why torch.compile cannot run here (Inductor builds its CPU kernels with a C++ compiler
    and Python's headers), or None."""
    try:
        torch.compile(lambda x: torch.sin(x) + 1)(torch.randn(8))
    except Exception as err:  # noqa: BLE001 - any failure means the same: no compiler here
        return f"torch.compile cannot build a kernel on this machine: {type(err).__name__}: {str(err).splitlines()[0]}"
    return None


INDUCTOR = pytest.mark.skipif(
    os.environ.get("SSLCTL_TEST_INDUCTOR") != "1",
    reason="Inductor's cold compile costs minutes of CPU on a 2-core CPU (ResNet-18: ~8): SSLCTL_TEST_INDUCTOR=1 runs it",
)


@pytest.mark.parametrize("backend", ["aot_eager", pytest.param("inductor", marks=INDUCTOR)])
def test_compiled_run_matches_eager_and_exports_the_same_encoder(backend, mini_shards, tmp_path, one_thread):
    if backend == "inductor" and (reason := compile_unavailable()):
        pytest.skip(reason)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    cfg = load_recipe("moco_v2", variant="small", overrides=OVERRIDES)
    runs = {
        mode: pretrain(mini_shards, cfg, tmp_path / mode, device="cpu", seed=0, workers=0,
                       compile=backend if mode == "compiled" else False,
                       max_steps=STEPS, log_every=1, amp=False, channels_last=False)
        for mode in ("eager", "compiled")
    }
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    print(f"{backend}: {graphs} graphs captured")
    assert graphs >= 3  # backbone, projector and key encoder ran as compiled graphs, not eagerly

    rows = {mode: [r for r in metrics(run) if "loss" in r] for mode, run in runs.items()}
    assert len(rows["compiled"]) == len(rows["eager"]) == STEPS
    for key in ("loss", "z_std"):
        torch.testing.assert_close(
            torch.tensor([r[key] for r in rows["compiled"]]), torch.tensor([r[key] for r in rows["eager"]]),
            rtol=LOSS_TOL, atol=0.0, msg=lambda m: f"{key} per step, compiled vs eager: {m}",
        )

    eager, _ = load_encoder(runs["eager"] / "encoder.safetensors")
    compiled, meta = load_encoder(runs["compiled"] / "encoder.safetensors")  # strict=True inside
    assert meta["arch"] == TINY_RESNET and meta["small_stem"]
    assert list(compiled.state_dict()) == list(eager.state_dict())
    for name, count in eager.state_dict().items():  # every BN statistics update happened
        if name.endswith("num_batches_tracked"):
            assert torch.equal(compiled.state_dict()[name], count), name

    # The exported encoders compute the same features (eval mode: BN running statistics
    # included): what the 4 steps changed, compiled vs eager, relative to the change itself.
    torch.manual_seed(0)  # the engine's initialisation for seed 0
    start = build_method(cfg).backbone
    x = torch.randn(64, 3, 28, 28)
    with torch.no_grad():
        before, f_eager, f_compiled = (net.eval()(x) for net in (start, eager, compiled))
    gap = ((f_compiled - f_eager).norm() / (f_eager - before).norm()).item()
    print(f"compiled vs eager: losses {[r['loss'] for r in rows['compiled']]} vs {[r['loss'] for r in rows['eager']]}; "
          f"features' change differs by {gap:.1e}")
    assert gap < FEATURE_TOL, gap

    saved = {mode: ckpt.load(ckpt.checkpoint_path(run))["model"] for mode, run in runs.items()}
    assert list(saved["compiled"]) == list(saved["eager"])
    assert not any("_orig_mod" in key for key in saved["compiled"])
