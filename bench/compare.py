"""sslctl beside lightly on the same work: docs/spec/protocols.md B1 (throughput) and B2 (kNN after
a fixed budget of steps, or of wall-clock minutes), for MoCo v2, SimCLR, BYOL, SimSiam, Barlow
Twins, VICReg and DINO (ResNet-18 `dino`, ViT-Tiny `dino_vit`); AdCo (no lightly counterpart)
beside sslctl's MoCo v2.

    pip install -e .[bench]                      # lightly (does not change torch)
    python bench/compare.py --protocol b1        # 30 steps after 3 warm-up, 3 repeats
    python bench/compare.py --protocol b2        # 300 steps, then kNN (k=200/T=0.1, k=20/T=0.07)
    python bench/compare.py --protocol b2-wall --minutes 10
    python bench/compare.py --protocol b1 --methods moco_v2 --steps 6 --warmup 2 --repeats 1   # smoke
    python bench/compare.py --protocol b1 --methods simsiam,barlow_twins,vicreg                # B1, new methods

Both libraries train the same model (torchvision resnet18, small stem, fc removed; for dino_vit
timm's vit_tiny_patch16_224 at 32 px with 4-px patches), batch (128
source images), views and augmentation parameters (each method's small-image settings, no blur),
heads, loss, optimizer (SGD lr 0.06 x bs/128, momentum 0.9, wd 5e-4, cosine per step over one
epoch) and number of steps. Each run is its own process, and the libraries alternate (the order
flips every repeat) so that machine noise hits both alike.

  sslctl   the real path: `python -m sslctl pretrain SHARDS --recipe M --variant small --set ...`
           (its loader over WebDataset shards, its loop, its defaults: bf16 autocast where the
           CPU has native bf16, channels_last). SSLCTL_OVERRIDES below are the --set keys that
           make the recipe equal to the protocol and to lightly's parts.
  lightly  bench/_lightly_side.py: lightly's heads, losses, momentum helpers and transforms
           written as lightly's documentation examples write them.

Measured per run: source images/s over the timed steps (loader included), data-wait % (time
blocked on the loader / step time), peak memory (RSS of the training process; PSS of it plus
its loader workers, sampled), FLOPs per step (torch.utils.flop_counter on one real step) over
step time, as a fraction of the device's measured peak (bench/peak_flops.py). B2 then embeds
Fashion-MNIST train (60k) and test (10k) with each backbone through the same code (sslctl's
embed_shards, eval transform, fp32) and runs weighted kNN, beside the floors (random-init
ResNet-18, raw pixels). Markdown tables go to stdout; the JSON record to bench/results/.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
BENCH = REPO / "bench"
sys.path[:0] = [str(BENCH), str(REPO)]  # peak_flops, _lightly_side; sslctl without an install

import peak_flops  # noqa: E402

BATCH = 128
STEPS_PER_EPOCH = 60000 // BATCH  # Fashion-MNIST train, whole batches
LIGHTLY_METHODS = ("moco_v2", "simclr", "byol", "simsiam", "barlow_twins", "vicreg", "dino", "dino_vit")
ALL_METHODS = ("moco_v2", "simclr", "byol", "adco", "simsiam", "barlow_twins", "vicreg", "dino", "dino_vit")
RECIPE = {"dino_vit": "dino"}  # a bench method -> the sslctl recipe it runs
VIEW_SIZES = {"dino": [32, 32, 16, 16, 16, 16], "dino_vit": [32, 32, 16, 16, 16, 16]}  # default: 2 x 32 px
KNN = ((200, 0.1), (20, 0.07))

# The protocol, common to every method: ImageNet normalisation, SGD at lr 0.06 x 128/128, wd 5e-4,
# momentum 0.9 on every parameter, cosine per step over one epoch to 0, no warmup.
_COMMON = [
    "augment.normalize=imagenet", "optim.name=sgd", "optim.batch_size=128", "optim.base_batch=128",
    "optim.scaling=linear", "optim.momentum=0.9", "schedule.epochs=1", "schedule.warmup_epochs=0",
    "schedule.lr_schedule=cosine", "schedule.per=step", "schedule.final_lr=0.0",
]
# lightly's parts where sslctl's recipe differs (the lightly side cannot express sslctl's):
#  - losses: sslctl's NT-Xent is the TF total (2x lightly's mean over 2N anchors) and its BYOL loss
#    sums (2 - 2cos) over both directions (4x lightly's 0.5 * sum of -cos), so the same SGD update
#    needs lr / s and weight decay x s (s = 2, 4): u = (lr/s)(s g + s wd w) = lr (g + wd w).
#  - heads: lightly's last projector/predictor Linear has a bias and SimCLR's no final BN.
#  - views: lightly's ColorJitter brightness is multiplicative; its crop interpolation bilinear.
#  - MoCo/AdCo: lightly's example has no shuffle-BN (one process, plain BN in both encoders).
#  - SimCLR: lightly's example runs a forward per view (BN statistics per view); sslctl's recipe
#    puts both views through the backbone as one batch (the TF code), so the parity run unfuses.
#  - SimSiam: the protocol's SGD on every parameter, so no fixed predictor lr (lightly's example
#    has none). Barlow Twins / VICReg: the protocol's SGD instead of the recipes' LARS, no loss
#    scale (solo-learn's 0.1 in the small variant), VICReg's variance weight 25 on the paper's
#    averaged hinge (lightly's, and the recipe's top level), bilinear crops.
#  - DINO: sslctl's student takes the crops of one size as one batch (the official
#    MultiCropWrapper), lightly's example a forward per view: the same FLOPs, BN statistics over
#    both global crops (ResNet) instead of per crop. The head, prototypes, 2 + 4 crops, momentum
#    and the first epoch's frozen last layer are lightly's; no gradient clipping on either side;
#    lightly's DINOTransform crops bicubic, sslctl's small variant bilinear.
SSLCTL_OVERRIDES = {
    "moco_v2": _COMMON + ["optim.lr=0.06", "optim.weight_decay=5e-4", "method.shuffle_bn=false"],
    "adco": _COMMON + ["optim.lr=0.06", "optim.weight_decay=5e-4", "method.shuffle_bn=false"],
    "simclr": _COMMON + [
        "optim.lr=0.03", "optim.weight_decay=1e-3", "optim.exclude_bn_bias=false",
        "head.projector_last_bias=true", "head.projector_last_norm=false", "method.fused_views=false",
        "augment.jitter_brightness=multiplicative", "augment.interpolation=bilinear",
    ],
    "byol": _COMMON + [
        "optim.lr=0.015", "optim.weight_decay=2e-3", "optim.exclude_bn_bias=false",
        "head.projector_last_bias=true", "head.predictor_last_bias=true",
        "augment.jitter_brightness=multiplicative", "augment.interpolation=bilinear",
    ],
    "simsiam": _COMMON + ["optim.lr=0.06", "optim.weight_decay=5e-4", "method.fix_pred_lr=false", "augment.blur_p=0.0"],
    "barlow_twins": _COMMON + [
        "optim.lr=0.06", "optim.weight_decay=5e-4", "optim.exclude_bn_bias=false", "loss.scale=1.0",
        "head.projector_last_bias=true", "augment.interpolation=bilinear",
    ],
    "vicreg": _COMMON + [
        "optim.lr=0.06", "optim.weight_decay=5e-4", "optim.exclude_bn_bias=false", "loss.std_coeff=25.0",
        "head.projector_last_bias=true", "augment.interpolation=bilinear",
    ],
}
_DINO = _COMMON + [
    "optim.lr=0.06", "optim.weight_decay=5e-4", "optim.weight_decay_end=5e-4", "optim.exclude_bn_bias=false",
    "method.base_momentum=0.996", "method.clip_grad=0", "head.projector_hidden=[2048, 2048]", "head.projector_dim=256",
    "head.prototypes=4096", "augment.crop_scale=[0.08, 1.0]", "augment.extra_crops=4", "augment.extra_crop_size=16",
    "augment.extra_crop_scale=[0.05, 0.4]",
]
SSLCTL_OVERRIDES["dino"] = _DINO
SSLCTL_OVERRIDES["dino_vit"] = _DINO + [
    "encoder.name=timm:vit_tiny_patch16_224", "encoder.small_stem=false", "encoder.img_size=32", "encoder.patch_size=4",
    "encoder.dynamic_img_size=true", "encoder.drop_path_rate=0.0",
]


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------ memory sampling


def _children(pid: int) -> list[int]:
    kids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            if ppid == pid:
                kids.append(int(entry))
    return kids


def _pss_kb(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def _hwm_kb(pid: int) -> int:
    """The kernel's high-water RSS of the process's current image (VmHWM; reset by exec, unlike
    getrusage's maxrss, which carries the parent's peak over a fork + exec)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


class TreeMemory(threading.Thread):
    """Peak RSS of a process (its VmHWM, read until it exits) and peak PSS (proportional set size:
    shared pages split between the processes sharing them) of it and its descendants (DataLoader
    workers), sampled every `every` seconds."""

    def __init__(self, pid: int, every: float = 0.5):
        super().__init__(daemon=True)
        self.pid, self.every, self.peak_kb, self.hwm_kb = pid, every, 0, 0
        self._done = threading.Event()

    def run(self) -> None:
        while not self._done.is_set():
            pids, frontier = [], [self.pid]
            while frontier:
                p = frontier.pop()
                pids.append(p)
                frontier += _children(p)
            self.peak_kb = max(self.peak_kb, sum(_pss_kb(p) for p in pids))
            self.hwm_kb = max(self.hwm_kb, _hwm_kb(self.pid))
            self._done.wait(self.every)

    def stop(self) -> int:
        self._done.set()
        self.join()
        return self.peak_kb


def run_process(cmd: list[str], log_path: Path, deadline: float | None = None) -> dict:
    """Run `cmd` (stdout+stderr to log_path); SIGTERM it at `deadline` (unix time). Returns exit
    code, wall seconds, peak RSS of the process itself and the sampled peak PSS of its tree."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
    start = time.time()
    with open(log_path, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=REPO, env=env)
        sampler = TreeMemory(proc.pid)
        sampler.start()
        signalled = False
        while True:
            pid, status = os.waitpid(proc.pid, os.WNOHANG)
            if pid:
                break
            if deadline and not signalled and time.time() >= deadline:
                proc.send_signal(signal.SIGTERM)
                signalled = True
            time.sleep(0.05)
        proc.returncode = os.waitstatus_to_exitcode(status)
    peak_pss = sampler.stop()
    return {
        "returncode": proc.returncode, "wall_s": time.time() - start, "signalled": signalled,
        "peak_rss_mb": sampler.hwm_kb / 1024, "peak_tree_pss_mb": peak_pss / 1024,
    }


def fail(what: str, log_path: Path) -> None:
    tail = log_path.read_text()[-3000:] if log_path.exists() else ""
    raise SystemExit(f"{what} failed; the end of {log_path}:\n{tail}")


# ------------------------------------------------------------------------------ the two sides


def sslctl_cmd(method: str, run: Path, args, steps: int) -> list[str]:
    cmd = [
        sys.executable, "-m", "sslctl", "pretrain", str(args.shards), "--recipe", RECIPE.get(method, method), "--variant", "small",
        "--out", str(run), "--max-steps", str(steps), "--log-every", "1", "--checkpoint-every", "1000000",
        "--workers", str(args.workers), "--device", args.device, "--seed", str(args.seed),
    ]
    for item in SSLCTL_OVERRIDES[method] + [f"schedule.epochs={args.epochs}"] + list(args.sslctl_set):
        cmd += ["--set", item]
    return cmd + args.sslctl_args.split()


def run_to_deadline(method: str, cmd: list[str], run: Path, args, deadline: float | None) -> tuple[dict, list[dict], int]:
    """An sslctl pretrain `cmd` into `run`, to its end or the deadline (SIGTERM: it checkpoints),
    then, if the deadline stopped it, the encoder exported at the step reached. (The process's
    record, the metrics records, the steps done.)"""
    proc = run_process(cmd, run.parent / f"{run.name}.log", deadline)
    if proc["returncode"] != 0 and not (proc["signalled"] and proc["returncode"] in (143, -15)):
        fail(f"sslctl {method}", run.parent / f"{run.name}.log")
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    done = max((r["step"] for r in records if "step" in r), default=0)
    if not (run / "encoder.safetensors").exists():
        if run_process(sslctl_cmd(method, run, args, done), run.parent / f"{run.name}.export.log")["returncode"] != 0:
            fail(f"sslctl {method} encoder export", run.parent / f"{run.name}.export.log")
    return proc, records, done


def run_sslctl(method: str, run: Path, args, steps: int, deadline: float | None) -> dict:
    shutil.rmtree(run, ignore_errors=True)
    cmd = sslctl_cmd(method, run, args, steps)
    proc, records, done = run_to_deadline(method, cmd, run, args, deadline)
    steps_rec = [r for r in records if r.get("images_per_s")]
    times = [BATCH / r["images_per_s"] for r in steps_rec]
    waits = [t * r["data_wait_pct"] / 100.0 for t, r in zip(times, steps_rec)]
    return {
        **proc, "library": "sslctl", "method": method, "steps": done, "step_times": times, "waits": waits,
        "losses": [r["loss"] for r in steps_rec], "command": " ".join(cmd), "run": str(run),
    }


def run_lightly(method: str, run: Path, args, steps: int, deadline: float | None) -> dict:
    shutil.rmtree(run, ignore_errors=True)
    cmd = [
        sys.executable, str(BENCH / "_lightly_side.py"), "--method", method, "--out", str(run),
        "--fmnist", str(args.fmnist), "--data-root", str(args.work / "torchvision"), "--steps", str(steps),
        "--workers", str(args.workers), "--device", args.device, "--seed", str(args.seed), "--epochs", str(args.lightly_epochs),
    ]
    if deadline:
        cmd += ["--deadline", repr(deadline)]
    run_log = run.parent / f"{run.name}.log"
    proc = run_process(cmd, run_log)
    if proc["returncode"] != 0:
        fail(f"lightly {method}", run_log)
    record = json.loads((run / "result.json").read_text())
    return {**proc, **record, "command": " ".join(cmd), "run": str(run)}


# ------------------------------------------------------------------------------ FLOPs per step


def count_flops(library: str, method: str, device: str) -> float:
    """FLOPs (matmuls and convolutions, forward + backward + the method's updates) of one real
    training step of a 128-image batch, counted by torch.utils.flop_counter."""
    from torch.utils.flop_counter import FlopCounterMode

    torch.manual_seed(0)
    views = [torch.randn(BATCH, 3, s, s, device=device) for s in VIEW_SIZES.get(method, [32, 32])]
    counter = FlopCounterMode(display=False)
    if library == "lightly":
        import _lightly_side

        setup = _lightly_side.Setup(method, STEPS_PER_EPOCH)
        setup.model.to(device).train()
        setup.criterion.to(device)
        with counter:
            setup.loss(views, 0).backward()
    else:
        from sslctl.methods import Progress, build_method
        from sslctl.recipes import load_recipe

        cfg = load_recipe(RECIPE.get(method, method), variant="small", overrides=SSLCTL_OVERRIDES[method])
        m = build_method(cfg).to(device).train()
        progress = Progress(step=0, total_steps=STEPS_PER_EPOCH, epoch=0, steps_per_epoch=STEPS_PER_EPOCH)
        with counter:
            m.before_forward(progress)
            m.training_step(views)["loss"].backward()
            m.after_optimizer_step(progress)
    return float(counter.get_total_flops())


def flops_table(args, pairs: list[tuple[str, str]]) -> dict[str, float]:
    cache_path = args.work / "flops.json"
    cache = json.loads(cache_path.read_text()) if cache_path.exists() else {}
    for library, method in pairs:
        key = f"{library}:{method}:{BATCH}"
        if key not in cache:
            log(f"counting FLOPs of one {library} {method} step ...")
            cache[key] = count_flops(library, method, args.device)
            cache_path.write_text(json.dumps(cache, indent=1))
    return {f"{lib}:{m}": cache[f"{lib}:{m}:{BATCH}"] for lib, m in pairs}


# ------------------------------------------------------------------------------ kNN evaluation


def _features(model: torch.nn.Module, args, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    from sslctl.augment import IMAGENET_MEAN, IMAGENET_STD, eval_transform
    from sslctl.data import split_shards
    from sslctl.embed import embed_shards

    device = torch.device(args.device)
    model = model.to(device).eval()
    parts = sorted(
        embed_shards(model, split_shards(args.shards, split), transform=eval_transform(32, IMAGENET_MEAN, IMAGENET_STD),
                     batch_size=512, device=device, bf16=False, channels_last=True, workers=args.workers),
        key=lambda part: part[0],
    )
    return torch.cat([p[1] for p in parts]), torch.cat([p[2] for p in parts])


def knn(train: tuple, test: tuple) -> dict:
    from sslctl.evaluate.knn import weighted_knn

    results = weighted_knn(train[0], train[1], test[0], test[1], ks=[k for k, _ in KNN], temperatures=[t for _, t in KNN])
    return {f"k={r['k']}/T={r['temperature']:g}": r["top1"] for r in results}


def knn_of_encoder(path: Path, args) -> dict:
    from sslctl.encoder_io import load_encoder

    model, _ = load_encoder(path)
    return knn(_features(model, args, "train"), _features(model, args, "test"))


def floors(args) -> dict:
    """kNN of a randomly initialised ResNet-18 (seed 0, small stem) and of raw pixels (cosine)."""
    cache_path = args.work / f"floors-{args.device}.json"
    if cache_path.exists():
        return json.loads(cache_path.read_text())
    from sslctl.data import iter_shard, split_shards
    from sslctl.encoders import build_backbone

    log("floors: random-init ResNet-18 and raw pixels ...")
    torch.manual_seed(0)
    random_net = build_backbone("resnet18", small_stem=True)
    result = {"random-init ResNet-18": knn(_features(random_net, args, "train"), _features(random_net, args, "test"))}

    def pixels(split):
        xs, ys = [], []
        for tar in split_shards(args.shards, split):
            for _key, image, label in iter_shard(tar):
                xs.append(image.flatten().float())
                ys.append(label)
        return torch.stack(xs), torch.tensor(ys)

    result["raw pixels"] = knn(pixels("train"), pixels("test"))
    cache_path.write_text(json.dumps(result, indent=1))
    return result


# ------------------------------------------------------------------------------ summaries


def summarise(runs: list[dict], warmup: int, flops: dict, peak: dict) -> dict:
    """Per (method, library): median images/s over repeats (each over the steps after `warmup`),
    data-wait %, peak memory, achieved FLOP/s and fraction of the measured peak."""
    out: dict[str, dict] = {}
    for key in sorted({(r["method"], r["library"]) for r in runs}):
        group = [r for r in runs if (r["method"], r["library"]) == key]
        rates, wait_pcts = [], []
        for r in group:
            times, waits = r["step_times"][warmup:], r["waits"][warmup:]
            if times:
                rates.append(BATCH * len(times) / sum(times))
                wait_pcts.append(100.0 * sum(waits) / sum(times))
        ips = statistics.median(rates) if rates else float("nan")
        f = flops.get(f"{key[1]}:{key[0]}")
        achieved = f * ips / BATCH if f and rates else None
        out[f"{key[0]}:{key[1]}"] = {
            "method": key[0], "library": key[1], "images_per_s": ips, "images_per_s_repeats": rates,
            "data_wait_pct": statistics.median(wait_pcts) if wait_pcts else None,
            "peak_rss_mb": max(r["peak_rss_mb"] for r in group),
            "peak_tree_pss_mb": max(r["peak_tree_pss_mb"] for r in group),
            "gflop_per_step": f / 1e9 if f else None,
            "achieved_gflop_s": achieved / 1e9 if achieved else None,
            "fraction_of_fp32_peak": achieved / peak["fp32"] if achieved else None,
            "fraction_of_bf16_peak": achieved / peak["bf16"] if achieved else None,
            "steps": [r["steps"] for r in group], "final_loss": group[-1]["losses"][-1] if group[-1]["losses"] else None,
            "knn": group[-1].get("knn"),
        }
    return out


def _baseline(summary: dict, method: str) -> dict | None:
    """What a row is compared with: lightly's same method; for AdCo, sslctl's MoCo v2."""
    return summary.get("moco_v2:sslctl") if method == "adco" else summary.get(f"{method}:lightly")


def markdown(summary: dict, protocol: str, floor: dict | None) -> str:
    lines = []
    if protocol == "b1":
        lines += [
            "| method | library | images/s (median) | vs baseline | data-wait % | peak RSS MB | peak PSS with workers MB | GFLOP/step | GFLOP/s | % of fp32 peak | % of bf16 peak |",
            "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
        ]
    else:
        lines += [
            "| method | library | steps | images/s | vs baseline | data-wait % | kNN top-1 k=200/T=0.1 | kNN top-1 k=20/T=0.07 | final loss |",
            "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
        ]
    for s in summary.values():
        base = _baseline(summary, s["method"])
        ratio = f"{s['images_per_s'] / base['images_per_s']:.2f}x" if base and base is not s else "-"
        if s["method"] == "adco" and base:
            ratio += " (vs sslctl MoCo v2)"
        wait = f"{s['data_wait_pct']:.1f}" if s["data_wait_pct"] is not None else "-"
        if protocol == "b1":
            pct = lambda v: f"{100 * v:.1f}" if v is not None else "-"  # noqa: E731
            lines.append(
                f"| {s['method']} | {s['library']} | {s['images_per_s']:.1f} | {ratio} | {wait} | {s['peak_rss_mb']:.0f} | "
                f"{s['peak_tree_pss_mb']:.0f} | {s['gflop_per_step'] or 0:.0f} | {s['achieved_gflop_s'] or 0:.1f} | "
                f"{pct(s['fraction_of_fp32_peak'])} | {pct(s['fraction_of_bf16_peak'])} |"
            )
        else:
            k = s.get("knn") or {}
            acc = [f"{k[name]:.2f}" if name in k else "-" for name in ("k=200/T=0.1", "k=20/T=0.07")]
            loss = f"{s['final_loss']:.4f}" if s["final_loss"] is not None else "-"
            lines.append(
                f"| {s['method']} | {s['library']} | {max(s['steps'])} | {s['images_per_s']:.1f} | {ratio} | {wait} | "
                f"{acc[0]} | {acc[1]} | {loss} |"
            )
    for name, k in (floor or {}).items():
        lines.append(f"| floor | {name} | - | - | - | - | {k['k=200/T=0.1']:.2f} | {k['k=20/T=0.07']:.2f} | - |")
    return "\n".join(lines)


def machine() -> dict:
    model = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "?")
    flags = next((line for line in open("/proc/cpuinfo") if line.startswith("flags")), "")
    info = {
        "cpu": model, "cores": len(os.sched_getaffinity(0)), "avx512_bf16": "avx512_bf16" in flags,
        "amx_bf16": "amx_bf16" in flags, "torch": torch.__version__, "python": platform.python_version(),
        "torch_threads": torch.get_num_threads(),
    }
    try:
        import lightly

        info["lightly"] = lightly.__version__
    except ImportError:
        info["lightly"] = None
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    try:
        info["sslctl_commit"] = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
        info["sslctl_dirty"] = bool(subprocess.run(["git", "status", "--porcelain", "sslctl", "recipes"], cwd=REPO, capture_output=True, text=True).stdout.strip())
    except OSError:
        pass
    return info


# ------------------------------------------------------------------------------ main


def prepare(args) -> None:
    args.work.mkdir(parents=True, exist_ok=True)
    if args.shards is None:
        args.shards = args.work / "fmnist-shards"
        if not (args.shards / "manifest.json").exists():
            log(f"sharding {args.fmnist} into {args.shards} ...")
            proc = run_process([sys.executable, "-m", "sslctl", "shard", str(args.fmnist), str(args.shards)], args.work / "shard.log")
            if proc["returncode"] != 0:
                fail("sslctl shard", args.work / "shard.log")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--protocol", choices=("b1", "b2", "b2-wall"), default="b1")
    ap.add_argument("--methods", default=",".join(ALL_METHODS), help=f"comma list of {', '.join(ALL_METHODS)}")
    ap.add_argument("--libraries", default="sslctl,lightly")
    ap.add_argument("--steps", type=int, default=None, help="b1: timed steps (30); b2: training steps (300)")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps first (b1), or left out of images/s (b2)")
    ap.add_argument("--repeats", type=int, default=None, help="b1: 3; b2: 1")
    ap.add_argument("--minutes", type=float, default=10.0, help="b2-wall: the wall-clock budget per run")
    ap.add_argument("--epochs", type=int, default=1,
                    help="the cosine schedule spans this many epochs, both libraries (b2-wall: at most this many are run; "
                         "more than 1 for fast devices, where one epoch takes seconds)")
    ap.add_argument("--lightly-epochs", type=float, default=None,
                    help="lightly's schedule length in epochs when it should differ from --epochs [--epochs]; b2-wall: "
                         "let each library's cosine end within the budget at its own speed (fractions allowed)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--workers", type=int, default=None, help="loader processes, both libraries [sslctl's default: cores - 1]")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--fmnist", type=Path, default=Path(os.environ.get("FMNIST", REPO.parent / "shared/datasets/fashion-mnist")))
    ap.add_argument("--shards", type=Path, default=None, help="sslctl shards of --fmnist [made in --work when absent]")
    ap.add_argument("--work", type=Path, default=REPO / "runs" / "bench", help="run directories, shards, caches")
    ap.add_argument("--sslctl-set", action="append", default=[], help="extra --set for sslctl (lever experiments)")
    ap.add_argument("--sslctl-args", default="", help="extra sslctl pretrain flags, e.g. '--no-bf16 --no-channels-last'")
    ap.add_argument("--label", default="", help="a name for this configuration in the results file")
    ap.add_argument("--out", type=Path, default=None, help="results JSON [bench/results/PROTOCOL-DEVICE-TIME.json]")
    args = ap.parse_args()

    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    libraries = [lib.strip() for lib in args.libraries.split(",") if lib.strip()]
    bad = [m for m in methods if m not in ALL_METHODS] + [lib for lib in libraries if lib not in ("sslctl", "lightly")]
    if bad:
        raise SystemExit(f"unknown method/library {bad}; methods: {', '.join(ALL_METHODS)}; libraries: sslctl, lightly")
    b1 = args.protocol == "b1"
    steps = args.steps or (30 if b1 else 300)
    if args.lightly_epochs is None:
        args.lightly_epochs = args.epochs
    epochs_of = {"sslctl": args.epochs, "lightly": args.lightly_epochs}

    def total_steps(library: str) -> int:
        return steps + args.warmup if b1 else (steps if args.protocol == "b2" else round(epochs_of[library] * STEPS_PER_EPOCH))

    repeats = args.repeats or (3 if b1 else 1)
    if args.workers is None:
        from sslctl.data import default_workers

        args.workers = default_workers()
    prepare(args)

    pairs = [(lib, m) for m in methods for lib in libraries if not (lib == "lightly" and m not in LIGHTLY_METHODS)]
    info = machine()
    log(f"{info['cpu']}, {info['cores']} cores, torch {info['torch']}, lightly {info['lightly']}; load average {os.getloadavg()}")
    peak = peak_flops.measure(args.device)
    log(f"peak: fp32 {peak['fp32'] / 1e9:.1f} GFLOP/s, bf16 {peak['bf16'] / 1e9:.1f} GFLOP/s")
    flops = flops_table(args, pairs)

    runs, stamp = [], datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    out = args.out or BENCH / "results" / f"{args.protocol}-{args.device.split(':')[0]}-{stamp}{'-' + args.label if args.label else ''}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_suffix(".partial.json")
    floor = floors(args) if not b1 else None
    for rep in range(repeats):
        for i, method in enumerate(methods):
            order = [lib for lib, m in pairs if m == method]
            if (rep + i) % 2:
                order.reverse()
            for library in order:
                run_dir = args.work / f"{args.protocol}-{stamp}" / f"{method}-{library}-r{rep}"
                run_dir.parent.mkdir(parents=True, exist_ok=True)
                deadline = time.time() + 60 * args.minutes if args.protocol == "b2-wall" else None
                load_before = os.getloadavg()
                log(f"[{args.protocol} repeat {rep + 1}/{repeats}] {library} {method}: {total_steps(library)} steps ...")
                side = run_sslctl if library == "sslctl" else run_lightly
                r = side(method, run_dir, args, total_steps(library), deadline)
                r.update(repeat=rep, load_before=load_before, load_after=os.getloadavg())
                times = r["step_times"][args.warmup:]
                log(f"    {r['steps']} steps, {BATCH * len(times) / max(1e-9, sum(times)):.1f} images/s after warm-up, "
                    f"wall {r['wall_s']:.0f} s, peak RSS {r['peak_rss_mb']:.0f} MB, load {r['load_after'][0]:.1f}")
                if not b1:
                    r["knn"] = knn_of_encoder(Path(r["run"]) / "encoder.safetensors", args)
                    log(f"    kNN top-1 {r['knn']}")
                runs.append(r)
                partial.write_text(json.dumps({"argv": sys.argv, "machine": info, "peak_flops": peak, "floors": floor, "runs": runs}))
    summary = summarise(runs, args.warmup, flops, peak)
    table = markdown(summary, args.protocol, floor)
    header = (
        f"{args.protocol.upper()} on {info.get('gpu') or info['cpu']} ({args.device}, {info['cores']} cores, torch {info['torch']}, "
        f"lightly {info['lightly']}); batch {BATCH}, "
        + {"b1": f"{steps} timed steps after {args.warmup} warm-up", "b2": f"{steps} steps",
           "b2-wall": f"{args.minutes:g} min per run from launch (cosine over {args.epochs:g} epoch(s) for sslctl, "
                      f"{args.lightly_epochs:g} for lightly; at most that)"}[args.protocol]
        + f", {repeats} repeat(s), "
        f"{args.workers} loader workers; peak fp32 {peak['fp32'] / 1e9:.0f} GFLOP/s, bf16 {peak['bf16'] / 1e9:.0f} GFLOP/s; "
        f"load average at the end {os.getloadavg()[0]:.1f}"
    )
    print(header + "\n\n" + table + "\n")
    record = {
        "protocol": args.protocol, "label": args.label, "argv": sys.argv, "machine": info, "peak_flops": peak,
        "flops_per_step": flops, "batch": BATCH, "steps": steps, "warmup": args.warmup, "repeats": repeats,
        "workers": args.workers, "sslctl_overrides": SSLCTL_OVERRIDES, "summary": summary, "floors": floor,
        "runs": runs, "table": table, "header": header,
    }
    out.write_text(json.dumps(record, indent=1))
    partial.unlink(missing_ok=True)
    log(f"results: {out}")


if __name__ == "__main__":
    main()
