"""Issue 7's levers, one at a time, on the model step alone (no loader): how much each buys for
sslctl's MoCo v2 / SimCLR / BYOL step under the B1 protocol (batch 128, 32 px, SGD).

    python bench/perf_levers.py [--methods moco_v2,byol,simclr] [--levers ...] [--repeats 3] [--profile]

Levers (each a full optimisation step: forward, backward, SGD step, the method's updates):
  lightly         lightly's step from bench/_lightly_side.py (fp32, as its examples), for reference
  fp32            contiguous fp32: what lightly's examples run
  channels_last   fp32, model and inputs channels_last
  bf16            bf16 autocast, contiguous
  bf16+cl         bf16 autocast + channels_last: sslctl's default on CPUs with AVX512-BF16
  bf16+cl+eval-k  as bf16+cl, the momentum/target branch in eval mode under inference_mode
                  (changes BN semantics: running statistics instead of batch statistics)
  bf16+cl+fused   as bf16+cl, BYOL's two views as ONE batch through online and target
                  (BN over 2B: SimCLR's semantics, not BYOL's per-view statistics)
  compile         bf16+cl with torch.compile on the method's modules (first steps compile)
The variants run round-robin (one step each per round, after one untimed round) so that load
from other processes hits them alike; the table gives the median step time and images/s.
--profile prints torch.profiler's top ops for the fp32 and bf16+cl steps of each method.
Uses sslctl's public parts only: load_recipe, build_method, build_optimizer, Method.training_step.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from compare import BATCH, SSLCTL_OVERRIDES, STEPS_PER_EPOCH  # noqa: E402
from sslctl.methods import Progress, build_method  # noqa: E402
from sslctl.optim import build_optimizer  # noqa: E402
from sslctl.recipes import load_recipe  # noqa: E402

LEVERS = ("lightly", "fp32", "channels_last", "bf16", "bf16+cl", "bf16+cl+eval-k", "bf16+cl+fused", "compile")


def _target(method: torch.nn.Module) -> torch.nn.Module | None:
    return getattr(method, "key_encoder", None) or getattr(method, "target", None)


class LightlyVariant:
    """lightly's model, loss and SGD step (bench/_lightly_side.py), timed like the others."""

    def __init__(self, method_name: str, device: torch.device):
        import _lightly_side

        torch.manual_seed(0)
        self.name, self.device, self.step_no = "lightly", device, 0
        self.setup = _lightly_side.Setup(method_name, STEPS_PER_EPOCH)
        self.setup.model.to(device).train()
        self.setup.criterion.to(device)
        self.optimizer = torch.optim.SGD(self.setup.model.parameters(), lr=0.06, momentum=0.9, weight_decay=5e-4)
        g = torch.Generator().manual_seed(1)
        self.views = [torch.randn(BATCH, 3, 32, 32, generator=g).to(device) for _ in range(2)]

    def step(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        loss = self.setup.loss(self.views, self.step_no)
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad()
        float(loss.detach())
        self.step_no += 1
        return time.perf_counter() - t


class Variant:
    def __init__(self, name: str, method_name: str, device: torch.device):
        self.name = name
        cfg = load_recipe(method_name, variant="small", overrides=SSLCTL_OVERRIDES[method_name])
        torch.manual_seed(0)
        self.method = build_method(cfg).to(device).train()
        self.cl = "cl" in name.split("+") or name in ("channels_last", "compile")
        self.bf16 = name.startswith("bf16") or name == "compile"
        if self.cl:
            self.method.to(memory_format=torch.channels_last)
        self.optimizer = build_optimizer(self.method, cfg["optim"], 0.06)
        self.device, self.step_no = device, 0
        target = _target(self.method)
        if name.endswith("eval-k") and target is not None:
            target.eval()
            target.train = lambda mode=True: target  # stay in eval mode when the method calls .train()
            forward = target.forward
            target.forward = lambda x: _inference(forward, x)
        if name.endswith("fused") and method_name == "byol":
            self.method.training_step = lambda views: _byol_fused(self.method, views)
        if name == "compile":
            for child in self.method.children():
                child.compile()
        g = torch.Generator().manual_seed(1)
        fmt = torch.channels_last if self.cl else torch.contiguous_format
        self.views = [torch.randn(BATCH, 3, 32, 32, generator=g).to(device).contiguous(memory_format=fmt) for _ in range(2)]

    def step(self) -> float:
        progress = Progress(step=self.step_no, total_steps=STEPS_PER_EPOCH, epoch=0, steps_per_epoch=STEPS_PER_EPOCH)
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        self.method.before_forward(progress)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            out = self.method.training_step(self.views)
        self.optimizer.zero_grad(set_to_none=True)
        out["loss"].backward()
        self.method.before_optimizer_step(progress)
        self.optimizer.step()
        self.method.after_optimizer_step(progress)
        float(out["loss"].detach())
        self.step_no += 1
        return time.perf_counter() - t


def _inference(forward, x):
    with torch.inference_mode():
        return forward(x).clone()  # a normal tensor again, usable by the loss


def _byol_fused(m, views):
    """BYOL with both views in one batch through each network (a lever with other BN semantics)."""
    from sslctl.losses.contrastive import regression_loss
    from sslctl.siamese import embedding_std

    x = torch.cat(views)
    z = m.projector(m.backbone(x))
    p1, p2 = m.predictor(z).chunk(2)
    with torch.no_grad():
        t1, t2 = m.target(x).chunk(2)
    return {"loss": regression_loss(p1, t2) + regression_loss(p2, t1), "z_std": embedding_std(z)}


def profile(variant: Variant, rows: int = 15) -> str:
    from torch.profiler import ProfilerActivity, profile as torch_profile

    variant.step()
    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        variant.step()
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--methods", default="moco_v2,byol,simclr")
    ap.add_argument("--levers", default="fp32,channels_last,bf16,bf16+cl,bf16+cl+eval-k,bf16+cl+fused")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--profile", action="store_true")
    args = ap.parse_args()
    device = torch.device(args.device)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {BATCH}, load average {__import__('os').getloadavg()}")
    print()
    print(f"| method | lever | step s (median) | images/s | vs {args.levers.split(',')[0]} |")
    print("| --- | --- | ---: | ---: | ---: |")
    for method_name in args.methods.split(","):
        levers = [lv for lv in args.levers.split(",") if not (lv.endswith("fused") and method_name != "byol")]
        levers = [lv for lv in levers if not (lv.endswith("eval-k") and method_name == "simclr")]
        variants = [LightlyVariant(method_name, device) if lv == "lightly" else Variant(lv, method_name, device) for lv in levers]
        for v in variants:  # warm-up round (allocator, oneDNN primitive caches, compilation)
            v.step()
        times = {v.name: [] for v in variants}
        for _ in range(args.repeats):
            for v in variants:
                times[v.name].append(v.step())
        base = statistics.median(times[levers[0]])
        for name in levers:
            t = statistics.median(times[name])
            print(f"| {method_name} | {name} | {t:.2f} | {BATCH / t:.1f} | {base / t:.2f}x |", flush=True)
        if args.profile:
            for v in variants:
                if v.name in ("lightly", "fp32", "bf16+cl"):
                    print(f"\n{method_name} {v.name}: top ops by self CPU time\n```\n{profile(v)}\n```\n", flush=True)
        del variants


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        main()
