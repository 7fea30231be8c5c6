"""The main job's settings, measured: one candidate = the whole `shell/pipeline.sh` (shard ->
pretrain -> embed twice -> knn / linear, trained and random-init floor), with the CPU seconds
(user + sys, /usr/bin/time) and wall seconds of every stage. Appends one JSON line per run to
--record and prints it on stdout.

    .venv/bin/python bench/mainjob_candidates.py --label moco-b128-e6 \\
        --pretrain-args "--epochs 6 --batch-size 128" [--images DIR] [--recipe moco_v2] [--seed 0]

The defaults are the quick start's (shell/quickstart.sh): its images, recipe and pretrain flags.
Set OMP_NUM_THREADS to fix the threads (the record keeps it, and the load average before and
after, since a shared machine inflates wall time but hardly CPU time).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RECORD = REPO / "bench" / "results" / "mainjob-candidates.jsonl"


def quickstart_default(name: str) -> str:
    """A default of shell/quickstart.sh, read from its `NAME=${...:-"VALUE"}` line."""
    text = (REPO / "shell" / "quickstart.sh").read_text()
    m = re.search(rf'^\s*(?:export )?{name}=\$\{{[A-Z_0-9]+:-"?([^"}}]*)"?\}}', text, re.M)
    if not m:
        raise SystemExit(f"shell/quickstart.sh: no {name}=${{...:-...}} default found")
    return m[1]


def stage_name(argv: list[str]) -> str:
    stage = argv[1]
    if stage == "embed" and "random" in argv:
        return "embed-floor"
    if stage in ("knn", "linear") and "floor" in Path(argv[2]).name:
        return f"{stage}-floor"
    return stage


def lines(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--label", required=True)
    p.add_argument("--images", default=None, help="dataset folder [the quick start's]")
    p.add_argument("--recipe", default=None, help="[the quick start's]")
    p.add_argument("--pretrain-args", default=None, help="`sslctl pretrain` flags [the quick start's]")
    p.add_argument("--embed-args", default="")
    p.add_argument("--seed", type=int, default=0, help="pretrain --seed")
    p.add_argument("--work", type=Path, default=None, help="work folder [a fresh temporary one]")
    p.add_argument("--record", type=Path, default=RECORD)
    p.add_argument("--reuse-floor", type=Path, default=None,
                   help="screening only: take shards/ and the floor's results from this earlier work folder of the "
                        "same images and architecture (those stages are then skipped and not timed)")
    args = p.parse_args()
    images = args.images or str(REPO / quickstart_default("IMAGES"))
    recipe = args.recipe or quickstart_default("RECIPE")
    pretrain_args = args.pretrain_args if args.pretrain_args is not None else quickstart_default("PRETRAIN_ARGS")

    work = args.work or Path(tempfile.mkdtemp(prefix="mainjob-"))
    if args.reuse_floor:
        work.mkdir(parents=True, exist_ok=True)
        shutil.copytree(args.reuse_floor / "shards", work / "shards", dirs_exist_ok=True)
        for name in ("floor.safetensors", "knn-floor.jsonl", "linear-floor.jsonl"):
            shutil.copy(args.reuse_floor / name, work / name)
    times = work / "stage-times.tsv"
    sslctl = Path(sys.executable).parent / "sslctl"
    env = {
        **os.environ,
        "SSLCTL": f"/usr/bin/time -a -o {times} -f %e\\t%U\\t%S\\t%C {sslctl}",
        "PRETRAIN_ARGS": f"{pretrain_args} --seed {args.seed}",
        "EMBED_ARGS": args.embed_args,
    }
    load_before = os.getloadavg()
    start = time.perf_counter()
    done = subprocess.run([str(REPO / "shell" / "pipeline.sh"), images, str(work), recipe], env=env,
                          stdout=subprocess.PIPE, text=True)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"pipeline.sh failed ({done.returncode}); work folder {work}")

    stages = {}
    for row in times.read_text().splitlines():
        elapsed, user, system, command = row.split("\t", 3)
        name = stage_name(shlex.split(command))
        stages[name] = {"wall_s": float(elapsed), "cpu_s": round(float(user) + float(system), 2)}
    metrics = lines(work / "run" / "metrics.jsonl")
    rates = [m["images_per_s"] for m in metrics if m.get("images_per_s")]
    result = {}
    for suffix, who in (("", "trained"), ("-floor", "floor")):
        for r in lines(work / f"knn{suffix}.jsonl"):
            result[f"knn_k{r['k']}_{who}"] = r["top1"]
        result[f"linear_{who}"] = lines(work / f"linear{suffix}.jsonl")[0]["top1"]
    margins = {f"{key[:-8]}_margin": round(result[key] - result[key[:-8] + "_floor"], 2)
               for key in result if key.endswith("_trained")}
    record = {
        "label": args.label,
        "command": f"{shlex.join(sys.argv)}",
        "images": images, "recipe": recipe, "floor_reused_from": str(args.reuse_floor) if args.reuse_floor else None, "pretrain_args": env["PRETRAIN_ARGS"], "embed_args": args.embed_args,
        **result, **margins,
        "steps": metrics[-1]["step"], "final_loss": metrics[-1]["loss"],
        "pretrain_images_per_s_median": sorted(rates)[len(rates) // 2] if rates else None,
        "stages": stages,
        "cpu_s_total": round(sum(s["cpu_s"] for s in stages.values()), 1),
        "wall_s_total": round(wall, 1),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "loadavg_before": [round(x, 2) for x in load_before],
        "loadavg_after": [round(x, 2) for x in os.getloadavg()],
        "machine": f"{platform.node()} {os.cpu_count()} cores",
        "time": time.strftime("%Y-%m-%d %H:%M:%S"),
        "work": str(work),
    }
    args.record.parent.mkdir(parents=True, exist_ok=True)
    with open(args.record, "a") as f:
        f.write(json.dumps(record) + "\n")
    print(json.dumps(record))


if __name__ == "__main__":
    main()
