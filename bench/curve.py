"""CIFAR-10 kNN top-1 against wall-clock minutes and steps, sslctl beside lightly (docs/performance.md,
"CIFAR-10 over wall-clock time").

    pip install -e .[bench]
    python bench/curve.py --methods simclr --minutes 30 --sslctl-epochs 3 --lightly-epochs 1.4
    python bench/curve.py --methods adco,moco_v2 --libraries sslctl --minutes 30 --sslctl-epochs 4
    python bench/curve.py --plot bench/results/curve-*.json --png docs/img/cifar10-curve.png

Each run trains on the full CIFAR-10 train split (50,000 JPEGs of ../shared/datasets/cifar10,
sharded once by `sslctl shard`) for `--minutes` from launch (imports and loader start-up count),
with compare.py's parity model and settings for both libraries (ResNet-18 small stem, batch 128,
SGD, each method's 32-px views, cosine per step to 0 over the schedule's epochs). Each library's
schedule is sized to end within the budget at its own speed: `--sslctl-epochs` (whole epochs: the
engine counts epochs in integers) and `--lightly-epochs` (fractions allowed). The runs alternate
between libraries, method by method.

Snapshots: the backbone as it was at the first step end past each of `--snapshots` minutes
(sslctl: the first checkpoints/last.pt written past it, every `--checkpoint-every` steps; lightly:
bench/_lightly_side.py exports it), and at the end. Each is evaluated afterwards by the same code
as compare.py's B2 (sslctl's embed_shards, 32-px eval transform, fp32; weighted kNN k=200/T=0.1 and
k=20/T=0.07 of test against the 50,000 train features), beside the same architecture at random
initialisation (seed 0), the floor.
A markdown table goes to stdout, the JSON record to bench/results/curve-DEVICE-TIME.json.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO / "bench"), str(REPO)]

import compare  # noqa: E402

CIFAR10 = REPO.parent / "shared" / "datasets" / "cifar10" / "cifar10-jpg.tar.gz"
PARITY_METHODS = ("adco", "moco_v2", "simclr", "byol")  # compare.py's like-for-like settings; any recipe with --sslctl-own
LIGHTLY_METHODS = ("moco_v2", "simclr", "byol")


def prepare(args) -> None:
    """CIFAR-10 JPEG folders (unpacked once) and their sslctl shards, under --work."""
    args.work.mkdir(parents=True, exist_ok=True)
    folders = args.cifar10 if args.cifar10.is_dir() else args.work / "cifar10"
    if not (folders / "train").is_dir():
        tmp = args.work / "cifar10.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        compare.log(f"unpacking {args.cifar10} ...")
        subprocess.run(["tar", "xzf", str(args.cifar10), "-C", str(tmp)], check=True)
        tmp.rename(folders)
    args.image_folder = folders / "train"
    args.shards = args.work / "cifar10-shards"
    if not (args.shards / "manifest.json").exists():
        compare.log(f"sharding {folders} ...")
        proc = compare.run_process([sys.executable, "-m", "sslctl", "shard", str(folders), str(args.shards)], args.work / "shard.log")
        if proc["returncode"] != 0:
            compare.fail("sslctl shard", args.work / "shard.log")
    train_images = json.loads((args.shards / "manifest.json").read_text())["splits"]["train"]["count"]
    compare.STEPS_PER_EPOCH = train_images // compare.BATCH  # whole batches, as both loaders drop the last


class CheckpointWatcher(threading.Thread):
    """Hard-links RUN/checkpoints/last.pt into RUN/snapshots/ the first time it is rewritten past
    each snapshot time (the engine replaces it by rename, so a link keeps that version whole)."""

    def __init__(self, run_dir: Path, start: float, at_seconds: list[float]):
        super().__init__(daemon=True)
        self.run_dir, self.start_time, self.pending = run_dir, start, sorted(at_seconds)
        self.taken: list[dict] = []
        self.done = threading.Event()

    def run(self) -> None:
        ckpt, seen = self.run_dir / "checkpoints" / "last.pt", None
        (self.run_dir / "snapshots").mkdir(parents=True, exist_ok=True)
        while not self.done.is_set() and self.pending:
            try:
                mtime = ckpt.stat().st_mtime
            except FileNotFoundError:
                mtime = None
            if mtime is not None and mtime != seen and mtime - self.start_time >= self.pending[0]:
                seen, seconds = mtime, mtime - self.start_time
                link = self.run_dir / "snapshots" / f"last-{len(self.taken)}.pt"
                try:
                    os.link(ckpt, link)
                except FileNotFoundError:  # replaced between stat and link: take the next one
                    continue
                self.taken.append({"seconds": seconds, "checkpoint": str(link)})
                while self.pending and seconds >= self.pending[0]:
                    self.pending.pop(0)
            time.sleep(0.2)


def encoder_from_checkpoint(checkpoint: Path, like: Path, out: Path) -> int:
    """The online backbone of a training checkpoint as an encoder file with `like`'s metadata
    (the run's final export); returns the checkpoint's step."""
    import torch
    from safetensors import safe_open

    from sslctl.artifacts import save_safetensors
    from sslctl.checkpoint import load

    state = load(checkpoint)
    with safe_open(str(like), "pt") as f:
        meta, names = f.metadata(), set(f.keys())
    tensors = {k[len("backbone."):]: v for k, v in state["model"].items() if k.startswith("backbone.")}
    if set(tensors) != names:
        raise SystemExit(f"{checkpoint}: its backbone.* tensors are not those of {like}")
    save_safetensors(out, {k: v.detach().to(torch.float32 if v.is_floating_point() else v.dtype).contiguous()
                           for k, v in tensors.items()}, meta)
    return int(state["step"])


def sslctl_cmd(method: str, run_dir: Path, args, steps: int) -> list[str]:
    """compare.py's command (its parity settings), or with --sslctl-own the recipe's small variant
    with only --sslctl-set on top (and ImageNet normalisation, which the evaluation uses)."""
    if not args.sslctl_own:
        return compare.sslctl_cmd(method, run_dir, args, steps)
    cmd = [
        sys.executable, "-m", "sslctl", "pretrain", str(args.shards), "--recipe", method, "--variant", "small",
        "--out", str(run_dir), "--max-steps", str(steps), "--log-every", "1", "--checkpoint-every", "1000000",
        "--workers", str(args.workers), "--device", args.device, "--seed", str(args.seed),
    ]
    for item in ["augment.normalize=imagenet", f"schedule.epochs={args.epochs}", *args.sslctl_set]:
        cmd += ["--set", item]
    return cmd


def run_sslctl(method: str, run_dir: Path, args, at_seconds: list[float]) -> dict:
    shutil.rmtree(run_dir, ignore_errors=True)
    cmd = sslctl_cmd(method, run_dir, args, 10**9)  # the schedule or the deadline ends it
    cmd[cmd.index("--checkpoint-every") + 1] = str(args.checkpoint_every)
    start = time.time()
    watcher = CheckpointWatcher(run_dir, start, at_seconds)
    watcher.start()
    try:
        proc, records, done = compare.run_to_deadline(method, cmd, run_dir, args, deadline=start + 60 * args.minutes)
    finally:
        watcher.done.set()
        watcher.join()
    final_seconds = proc["wall_s"]
    points = []
    for i, snap in enumerate(watcher.taken):
        path = run_dir / "snapshots" / f"encoder-{i}.safetensors"
        step = encoder_from_checkpoint(Path(snap["checkpoint"]), run_dir / "encoder.safetensors", path)
        Path(snap["checkpoint"]).unlink()
        points.append({"step": step, "seconds": snap["seconds"], "path": str(path)})
    points.append({"step": done, "seconds": final_seconds, "path": str(run_dir / "encoder.safetensors")})
    steps_rec = [r for r in records if r.get("images_per_s")]
    return {**proc, "library": "sslctl", "method": method, "command": " ".join(cmd), "points": points,
            "images_per_s": [r["images_per_s"] for r in steps_rec], "data_wait_pct": [r["data_wait_pct"] for r in steps_rec]}


def run_lightly(method: str, run_dir: Path, args, at_seconds: list[float]) -> dict:
    shutil.rmtree(run_dir, ignore_errors=True)
    start = time.time()
    cmd = [
        sys.executable, str(REPO / "bench" / "_lightly_side.py"), "--method", method, "--out", str(run_dir),
        "--image-folder", str(args.image_folder), "--steps", str(10**9), "--epochs", str(args.lightly_epochs),
        "--workers", str(args.workers), "--device", args.device, "--seed", str(args.seed),
        "--deadline", repr(start + 60 * args.minutes), "--snapshot-at", ",".join(f"{s:g}" for s in at_seconds),
    ]
    proc = compare.run_process(cmd, run_dir.parent / f"{run_dir.name}.log")
    if proc["returncode"] != 0:
        compare.fail(f"lightly {method}", run_dir.parent / f"{run_dir.name}.log")
    record = json.loads((run_dir / "result.json").read_text())
    points = [{"step": s["step"], "seconds": s["seconds"], "path": s["path"]} for s in record["snapshots"]]
    points.append({"step": record["steps"], "seconds": proc["wall_s"], "path": str(run_dir / "encoder.safetensors")})
    times = record["step_times"]
    return {**proc, "library": "lightly", "method": method, "command": " ".join(cmd), "points": points,
            "images_per_s": [compare.BATCH * len(times) / max(1e-9, sum(times))],
            "data_wait_pct": [100 * sum(record["waits"]) / max(1e-9, sum(times))]}


def floor_of(encoder: Path, args, cache: dict) -> str:
    """kNN of the same architecture at random initialisation (seed 0), measured once per
    architecture; returns its name in `cache`."""
    import torch
    from safetensors import safe_open

    from sslctl.augment import IMAGENET_MEAN, IMAGENET_STD
    from sslctl.encoder_io import save_encoder
    from sslctl.encoders import build_backbone

    with safe_open(str(encoder), "pt") as f:
        meta = f.metadata()
    small_stem = meta["small_stem"] == "true"
    name = f"random-init {meta['arch']} ({'small' if small_stem else 'standard'} stem)"
    if name not in cache:
        path = args.work / f"floor-{meta['arch']}-{'small' if small_stem else 'standard'}.safetensors"
        torch.manual_seed(0)
        net = build_backbone(meta["arch"], small_stem=small_stem)
        save_encoder(path, net, small_stem=small_stem, input_size=32, mean=IMAGENET_MEAN, std=IMAGENET_STD, recipe="random-init")
        compare.log(f"floor: {name} ...")
        cache[name] = compare.knn_of_encoder(path, args)
        compare.log(f"    {cache[name]}")
    return name


def markdown(runs: list[dict], floor: dict) -> str:
    keys = list(runs[0]["points"][0]["knn"])
    lines = ["| method | library | minutes | steps | " + " | ".join(keys) + " |", "| --- | --- | ---: | ---: |" + " ---: |" * len(keys)]
    for name, result in floor.items():
        lines.append(f"| {name} | | 0 | 0 | " + " | ".join(f"{result[k]:.2f}" for k in keys) + " |")
    for r in runs:
        for p in r["points"]:
            lines.append(f"| {r['method']} | {r['library']} | {p['seconds'] / 60:.1f} | {p['step']} | "
                         + " | ".join(f"{p['knn'][k]:.2f}" for k in keys) + " |")
    return "\n".join(lines)


def plot(records: list[Path], png: Path, key: str = "k=200/T=0.1") -> Path:
    """kNN top-1 against minutes, one line per method and library, the floor dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    floors = {}
    for path in records:
        record = json.loads(Path(path).read_text())
        floors.update(record["floors"])
        for r in record["runs"]:
            floor = record["floors"][r["floor"]][key]
            xs = [0.0] + [p["seconds"] / 60 for p in r["points"]]
            ys = [floor] + [p["knn"][key] for p in r["points"]]
            ax.plot(xs, ys, marker="o", linestyle="-" if r["library"] == "sslctl" else "--",
                    label=f"{r['library']} {r['method']}{' (own recipe)' if 'own recipe' in r.get('label', '') else ''}")
    for (name, result), style in zip(sorted(floors.items()), (":", "-.")):
        ax.axhline(result[key], color="gray", linestyle=style, label=name)
    ax.set_xlabel("wall-clock minutes from launch (2-core CPU)")
    ax.set_ylabel(f"CIFAR-10 kNN top-1 % ({key})")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=120, bbox_inches="tight")
    return png


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--methods", default="simclr", help=f"comma list of {', '.join(PARITY_METHODS)} (lightly: {', '.join(LIGHTLY_METHODS)})")
    ap.add_argument("--libraries", default="sslctl,lightly")
    ap.add_argument("--minutes", type=float, default=30.0, help="training budget per run, from launch")
    ap.add_argument("--snapshots", default="10,20", help="minutes at which the backbone is also evaluated (and at the end)")
    ap.add_argument("--sslctl-epochs", type=int, default=3, help="sslctl's schedule, whole epochs that end within --minutes")
    ap.add_argument("--lightly-epochs", type=float, default=1.4, help="lightly's schedule in epochs (fractions allowed)")
    ap.add_argument("--sslctl-set", action="append", default=[], help="extra --set for sslctl after the parity settings "
                                                                       "(e.g. encoder.small_stem=false); the floor follows the architecture")
    ap.add_argument("--sslctl-own", action="store_true", help="sslctl: the recipe's small variant and --sslctl-set, "
                                                               "not the parity settings (the best sslctl can do, not a like-for-like)")
    ap.add_argument("--checkpoint-every", type=int, default=25, help="sslctl: steps between checkpoints (the snapshots' grain)")
    ap.add_argument("--cifar10", type=Path, default=CIFAR10, help="cifar10-jpg.tar.gz, or a folder, with train/ and test/ class folders")
    ap.add_argument("--work", type=Path, default=REPO / "runs" / "curve", help="unpacked data, shards, run directories")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--workers", type=int, default=None, help="loader processes [sslctl's default: cores - 1]")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--label", default="")
    ap.add_argument("--plot", type=Path, nargs="*", default=None, help="only draw these records' curves into --png")
    ap.add_argument("--png", type=Path, default=REPO / "docs" / "img" / "cifar10-curve.png")
    args = ap.parse_args()
    if args.plot is not None:
        print(plot(args.plot, args.png))
        return
    methods = [m for m in args.methods.split(",") if m]
    libraries = [lib for lib in args.libraries.split(",") if lib]
    bad = [m for m in methods if m not in PARITY_METHODS and not args.sslctl_own] + [
        lib for lib in libraries if lib not in ("sslctl", "lightly")]
    if bad:
        raise SystemExit(f"unknown method/library {bad}; methods: {', '.join(PARITY_METHODS)} (any recipe with --sslctl-own); "
                         "libraries: sslctl, lightly")
    if args.workers is None:
        from sslctl.data import default_workers

        args.workers = default_workers()
    args.epochs, args.sslctl_args = args.sslctl_epochs, ""  # what compare.sslctl_cmd reads
    prepare(args)
    info = compare.machine()
    compare.log(f"{info['cpu']}, {info['cores']} cores, torch {info['torch']}, lightly {info['lightly']}; load {os.getloadavg()}")
    floor: dict[str, dict] = {}  # per architecture, measured after its first run
    at_seconds = [60 * float(m) for m in args.snapshots.split(",") if m.strip()]
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    out = REPO / "bench" / "results" / f"curve-{args.device.split(':')[0]}-{stamp}{'-' + args.label if args.label else ''}.json"
    runs = []
    for i, method in enumerate(methods):
        order = [lib for lib in libraries if lib == "sslctl" or method in LIGHTLY_METHODS]
        for library in order[::-1] if i % 2 else order:
            run_dir = args.work / f"curve-{stamp}" / f"{method}-{library}"
            run_dir.parent.mkdir(parents=True, exist_ok=True)
            compare.log(f"{library} {method}: {args.minutes:g} min ...")
            side = run_sslctl if library == "sslctl" else run_lightly
            r = side(method, run_dir, args, at_seconds)
            r["floor"] = floor_of(Path(r["points"][-1]["path"]), args, floor)
            if library == "sslctl" and (args.sslctl_set or args.sslctl_own):
                r["label"] = " (" + ", ".join((["own recipe"] if args.sslctl_own else []) + args.sslctl_set) + ")"
            for p in r["points"]:
                p["knn"] = compare.knn_of_encoder(Path(p["path"]), args)
                compare.log(f"    {p['seconds'] / 60:.1f} min, step {p['step']}: {p['knn']}")
            runs.append(r)
            out.with_suffix(".partial.json").write_text(json.dumps({"argv": sys.argv, "floors": floor, "runs": runs}))
    table = markdown(runs, floor)
    header = (f"CIFAR-10 kNN top-1 over wall-clock time on {info.get('gpu') or info['cpu']} ({args.device}, {info['cores']} cores, "
              f"torch {info['torch']}, lightly {info['lightly']}); {args.minutes:g} min per run from launch; schedules: sslctl "
              f"{args.sslctl_epochs} epoch(s), lightly {args.lightly_epochs:g}; {args.workers} loader workers")
    print(header + "\n\n" + table + "\n")
    out.write_text(json.dumps({"argv": sys.argv, "machine": info, "floors": floor, "runs": runs, "table": table,
                               "header": header, "sslctl_overrides": {m: compare.SSLCTL_OVERRIDES.get(m) for m in methods}}, indent=1))
    out.with_suffix(".partial.json").unlink(missing_ok=True)
    compare.log(f"results: {out}")


if __name__ == "__main__":
    main()
