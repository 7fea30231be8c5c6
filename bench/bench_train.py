"""Training throughput of `sslctl pretrain` (docs/spec/protocols.md B1), per recipe, with and without
channels_last and bf16 autocast.

B1: Fashion-MNIST train (28 px, upscaled to 32 by the crop, gray replicated to 3 channels,
ImageNet normalisation); the recipe's small variant (ResNet-18, small stem, 512-d); batch 128
source images; SGD lr 0.06 x bs/128, momentum 0.9, wd 5e-4, cosine per step; the method's
small-image augmentations with blur off at 32 px. Each run is the real engine (`pretrain`, loader
with its default workers included) for warm-up + measured steps; images/s and data-wait come
from its per-step metrics.jsonl: images/s = measured steps x 128 / their summed step time,
data-wait = time blocked on the loader / step time. Median over repeats. AdCo's ad_init (a
setup pass before step 0) is switched off: it is not a steady-state step.

    python bench/bench_train.py                                   # all four recipes, 4 settings, 3 repeats
    python bench/bench_train.py --recipes moco_v2 --steps 5 --warmup 1 --repeats 1   # a quick check

Prints a markdown table on stdout (progress on stderr). Data: full Fashion-MNIST from
../shared/datasets/fashion-mnist when present, else the embedded 5,000-image subset.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
from pathlib import Path

import torch

from sslctl import console
from sslctl.paths import EMBEDDED_DATASET
from sslctl.recipes import load_recipe
from sslctl.train import pretrain

REPO = Path(__file__).resolve().parents[1]
FULL_FMNIST = REPO.parent / "shared" / "datasets" / "fashion-mnist"
SETTINGS = {  # name -> (channels_last, bf16)
    "fp32": (False, False),
    "fp32 + channels_last": (True, False),
    "bf16": (False, True),
    "bf16 + channels_last": (True, True),
}
B1 = {  # docs/spec/protocols.md B1, applied where the recipe has the key
    "optim.batch_size": 128, "optim.name": "sgd", "optim.lr": 0.06, "optim.base_batch": 128,
    "optim.scaling": "linear", "optim.momentum": 0.9, "optim.weight_decay": 5e-4,
    "schedule.lr_schedule": "cosine", "schedule.per": "step", "schedule.warmup_epochs": 0,
    "augment.crop_size": 32, "augment.blur_p": 0.0, "augment.normalize": "imagenet",
    "method.ad_init": False,
}


def b1_recipe(name: str) -> dict:
    base = load_recipe(name, variant="small")
    overrides = [f"{k}={json.dumps(v)}" for k, v in B1.items() if k.split(".")[1] in base.get(k.split(".")[0], {})]
    for view in (k for k, v in base["augment"].items() if isinstance(v, dict)):
        if "blur_p" in base["augment"][view]:
            overrides.append(f"augment.{view}.blur_p=0.0")
    return load_recipe(name, variant="small", overrides=overrides)


def make_shards(cache: Path) -> Path:
    from sslctl.shard import shard

    source = FULL_FMNIST if (FULL_FMNIST / "train-images-idx3-ubyte.gz").exists() else EMBEDDED_DATASET
    out = cache / f"shards-{source.name}"
    if not (out / "manifest.json").exists():
        console.log(f"sharding {source} -> {out}")
        shard(source, out)
    return out


def one_run(shards: Path, cfg: dict, out: Path, steps: int, warmup: int, channels_last: bool, bf16: bool,
            device: str, workers: int | None) -> tuple[float, float]:
    """(source images/s, data-wait %) over `steps` steps after `warmup` steps."""
    pretrain(shards, cfg, out, device=device, resume="never", max_steps=warmup + steps, log_every=1,
             checkpoint_every=10**9, channels_last=channels_last, amp=bf16, workers=workers)
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    measured = [m for m in lines if "loss" in m][warmup:]
    batch = cfg["optim"]["batch_size"]
    times = [batch / m["images_per_s"] for m in measured]
    waits = [t * m["data_wait_pct"] / 100 for t, m in zip(times, measured)]
    return len(times) * batch / sum(times), 100 * sum(waits) / sum(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipes", nargs="+", default=["moco_v2", "simclr", "byol", "adco"])
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--workers", type=int, default=None, help="loader workers [default: the loader's default]")
    parser.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "sslctl-bench")
    args = parser.parse_args()

    console.set_quiet(True)
    shards = make_shards(args.cache)
    rows = []
    for name in args.recipes:
        cfg = b1_recipe(name)
        for setting in args.settings:
            channels_last, bf16 = SETTINGS[setting]
            results = []
            for rep in range(args.repeats):
                with tempfile.TemporaryDirectory(dir=args.cache) as tmp:
                    results.append(one_run(shards, cfg, Path(tmp) / "run", args.steps, args.warmup,
                                           channels_last, bf16, args.device, args.workers))
                print(f"{name} {setting} repeat {rep + 1}: {results[-1][0]:.1f} img/s, "
                      f"data-wait {results[-1][1]:.1f}%", file=sys.stderr)
            rows.append((name, setting, statistics.median(r[0] for r in results), statistics.median(r[1] for r in results)))

    device = torch.cuda.get_device_name() if args.device != "cpu" and torch.cuda.is_available() else platform.processor() or "cpu"
    print(f"B1 training throughput: {shards.name}, batch 128, {args.warmup} warm-up + {args.steps} measured steps, "
          f"median of {args.repeats}; {device}, torch {torch.__version__}, {torch.get_num_threads()} threads\n")
    print("| recipe | setting | source images/s | data-wait % |")
    print("| --- | --- | ---: | ---: |")
    for name, setting, ips, wait in rows:
        print(f"| {name} | {setting} | {ips:.1f} | {wait:.1f} |")


if __name__ == "__main__":
    main()
