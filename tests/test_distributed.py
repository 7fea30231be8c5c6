"""Data-parallel training and embedding (docs/spec/methods.md §0.6 and each method's part (f)).

Real processes talking over gloo on the CPU: ranks forked from the test process for the method
semantics (each rank joins through `distributed.init_from_env`, as under torchrun), and real
`sslctl ... --nproc 2` subprocesses (torch.distributed.run) for the launcher, the distributed
embed and the SIGTERM -> checkpoint -> resume path. Models are tiny (tests.realrun.TinyResNet,
ResNet-18's layout at a quarter of its width and half its depth, at 8 to 16 px, 4 images per
rank) so each test takes seconds; none of them is about the network.

How BN is made comparable between 2 ranks x B images and 1 rank x 2B images:
- SimCLR, BYOL, SwAV, SimSiam, Barlow Twins, VICReg: `method.sync_bn = true`, the recipes' setting. Under gloo it is
  distributed.GlooSyncBatchNorm, so the batch statistics are the global batch's, as with one
  process; BN stays in training mode.
- MoCo v2, AdCo: shuffle-BN gives each rank's key encoder the statistics of a random B-subset of
  the global batch, and SplitBatchNorm in one process uses sub-batches of the batch: these
  cannot give the same numbers by design. So every BN runs in eval mode (running statistics),
  which makes each encoder a per-sample function; then the only differences left between the
  two setups are the ones this file is about (keys gathered without gradient, the queue / bank
  update, the positive at the global index, gradient and bank-gradient averaging, the lr). The
  shuffle itself is tested in test_methods_founding.py (shuffled_keys undoes it on 2 ranks).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from unittest import mock

import pytest
import torch
from torch import nn

from sslctl import distributed as dist
from sslctl.errors import UserError
from tests.conftest import cli_on_forked_ranks, fork_ranks, free_port, run_bounded
from tests.realrun import TINY_RESNET

REPO = Path(__file__).resolve().parents[1]
ENV = {"OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
B = 4  # images per rank; the global batch is 2B
STEPS = 3
# [recipe overrides] that keep one step to milliseconds; warmup 0 so the first step moves the weights
TINY = [f"encoder.name={TINY_RESNET}", "augment.crop_size=8", "optim.batch_size=8", "schedule.warmup_epochs=0"]
METHODS = {
    "moco_v2": ["method.queue_size=32"],
    "adco": ["method.bank_size=32", "method.ad_init=false"],  # ad_init on 2 ranks: test_methods_founding.py
    "simclr": ["method.sync_bn=true"],
    "byol": ["method.sync_bn=true", "head.projector_hidden=[64]", "head.predictor_hidden=[64]"],
    "swav": ["method.sync_bn=true", "augment.extra_crops=2", "augment.extra_crop_size=8", "head.prototypes=16",
             "head.projector_hidden=[64]", "optim.lr=0.3"],
    # DINO: the centre is all-reduced (control below); local crops of another size, clipping on, prototypes not frozen
    "dino": ["head.prototypes=64", "head.projector_hidden=[64]", "head.projector_dim=16", "augment.extra_crops=2",
             "augment.extra_crop_size=4", "method.clip_grad=3.0", "method.freeze_last_layer_epochs=0"],
    # MoCo v3: keys gathered, SyncBN (the recipe's). SGD: with the small variant's LARS (eta 0.02, lr clipping)
    # the updates' float noise grows to 4% in 3 steps (0.01% after one step; 0.4% with SGD after 3). Measured
    # 2026-12-02 with SGD, largest tensor's error after 1 / 2 / 3 steps: ResNet-18 at 8 px 0.02% / 0.7% / 3.7%
    # (over UPDATE_TOLERANCE, many BN tensors; 0.15% after 3 at 16 px), TinyResNet at 8 px 0.01% after 3
    "mocov3": ["head.projector_hidden=[64]", "head.predictor_hidden=[64]", "optim.name=sgd", "optim.lr=0.3"],
    # the recipes' sync_bn = true; Barlow Twins all-reduces its standardisation and C, VICReg
    # gathers the embeddings: without either the test fails (measured: docs/methods.md)
    "simsiam": ["head.projector_hidden=[64, 64]", "head.projector_dim=64", "head.predictor_hidden=[64]", "head.predictor_dim=64"],
    "barlow_twins": ["head.projector_hidden=[64, 64]", "head.projector_dim=64"],
    "vicreg": ["head.projector_hidden=[64, 64]", "head.projector_dim=64"],
}
FROZEN_BN = {"moco_v2", "adco"}  # see the module docstring
# Allowed difference of the weight updates: the L2 norm of (2-rank update - 1-rank update) as a
# fraction of the 1-rank update's norm, per tensor. A semantic difference moves updates by O(1):
# SimCLR without the gather differs by 0.34 in the median tensor (test below). Float summation
# order differs (per-rank partial sums, and the convolution kernels oneDNN picks for B vs 2B
# images), and a few elements of an update at initialisation are ill-conditioned: on an Intel
# Xeon (AMX) the largest single element differed by up to 7% of the tensor's largest (SwAV) and
# even one process changed SimCLR's by 23% when only the convolution backend changed (mkldnn on /
# off), so elementwise comparison fails on some CPUs. In norm the 2 ranks stayed within 0.9%
# (SwAV), 0.5% (SimCLR) and below 0.1% (MoCo v2, AdCo, BYOL) on that CPU.
UPDATE_TOLERANCE = 3e-2
PER_RANK = {"queue"}  # SwAV's queue: each rank keeps its own shard (docs/spec/methods.md §4f), its shape depends on W
# Updates that are 0 in exact arithmetic, so their relative error is rounding over rounding:
# SimSiam's and MoCo v3's predictor BN sees Linear(z) with z from a BN without affine, whose batch
# mean is 0, so its running mean moves by ~1e-8. Both runs must leave it (nearly) where it was.
ZERO_UPDATES = {"simsiam": {"predictor.1.running_mean"}, "mocov3": {"predictor.1.running_mean"}}


# ------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def shards(tiny_shards) -> Path:
    """96 train + 48 test images of the embedded Fashion-MNIST, in uneven shards (40, 40, 16 and
    40, 8): 12 steps per epoch at a global batch of 8, 6 at 16."""
    return tiny_shards()


def _cli(*args: str, nproc: int = 1) -> list[str]:
    return [sys.executable, "-m", "sslctl", *args, *(["--nproc", str(nproc)] if nproc > 1 else [])]


def _run(cmd: list, **kw) -> subprocess.CompletedProcess:
    return run_bounded(cmd, env={**os.environ, **ENV}, **kw)


# ------------------------------------------------------------------------------ one step, W = 2 vs W = 1


def _global_views(cfg: dict, step: int) -> list[torch.Tensor]:
    """The step's views for the GLOBAL batch (2B images), the same in every process."""
    aug = cfg["augment"]
    sizes = [int(aug["crop_size"])] * 2 + [int(aug.get("extra_crop_size", 0))] * int(aug.get("extra_crops", 0))
    g = torch.Generator().manual_seed(1000 + step)
    return [torch.randn(2 * B, 3, s, s, generator=g) for s in sizes]


def _engine_steps(name: str, shards: Path, out: Path, extra: list[str] | None = None) -> dict:
    """STEPS training steps of the real engine (DDP when distributed) on fixed global views;
    this process feeds its rank's slice. Returns what the tests compare."""
    from sslctl.recipes import load_recipe
    from sslctl.run_options import RunOptions
    from sslctl.train import Engine

    cfg = load_recipe(name, variant="small", overrides=[*TINY, *METHODS[name], *(extra or [])])
    options = RunOptions(device="cpu", resume="never", seed=0, workers=0, log_every=1, channels_last=False, amp=False)
    engine = Engine(shards, cfg, out, options)
    engine.method.train()
    if name in FROZEN_BN:
        for m in engine.method.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.eval()
    before = {k: v.clone() for k, v in engine.method.state_dict().items()}
    n = 2 * B // dist.world_size()
    mine = slice(dist.rank() * n, (dist.rank() + 1) * n)
    losses = []
    for step in range(STEPS):
        losses.append(engine.train_step([v[mine] for v in _global_views(cfg, step)])["loss"])
        engine.step += 1
    return {
        "losses": losses, "before": before, "after": {k: v.clone() for k, v in engine.method.state_dict().items()},
        "peak_lr": engine.peak_lr, "batch_per_rank": engine.data.batch_per_rank, "world": engine.world,
        "sync_bn": sorted({type(m).__name__ for m in engine.method.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)}),
    }


def _update_error(run: dict, reference: dict, key: str) -> float:
    """|update - reference update| / |reference update| in L2 norm, for one tensor of the state."""
    update, expected = run["after"][key] - run["before"][key], reference["after"][key] - reference["before"][key]
    return ((update - expected).norm() / expected.norm().clamp_min(1e-30)).item()


def _bn_rank_check(rank: int) -> dict:
    """GlooSyncBatchNorm on this rank's half: output, gradients (averaged as DDP does) and running
    statistics, compared with BatchNorm on the whole batch in the test."""
    g = torch.Generator().manual_seed(7)
    x_all, w_out = torch.randn(2 * B, 3, 5, 5, generator=g) * 3 + 1, torch.randn(2 * B, 3, 5, 5, generator=g)
    bn = dist.convert_sync_batchnorm(nn.Sequential(nn.BatchNorm2d(3)))[0]
    x = x_all[rank * B : (rank + 1) * B].clone().requires_grad_(True)
    y = bn(x)
    (y * w_out[rank * B : (rank + 1) * B]).mean().backward()  # a per-rank mean, as every method's loss
    dist.all_reduce_mean(bn.weight.grad), dist.all_reduce_mean(bn.bias.grad)
    return {"type": type(bn).__name__, "y": y.detach(), "x_grad": x.grad, "w_grad": bn.weight.grad,
            "b_grad": bn.bias.grad, "running_mean": bn.running_mean, "running_var": bn.running_var}


def _rank_main(rank: int, port: int, shards: str, out: str) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2",
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    assert dist.init_from_env("cpu") and dist.world_size() == 2
    try:
        results = {name: _engine_steps(name, Path(shards), Path(out) / f"{name}-{rank}") for name in METHODS}
        # A control that must differ: SimCLR without the gather contrasts only local views.
        results["simclr_no_gather"] = _engine_steps("simclr", Path(shards), Path(out) / f"ng-{rank}", ["method.gather=false"])
        # ... and DINO with each rank's centre from its own teacher batch (the all-reduce removed)
        with mock.patch.object(dist, "all_reduce_mean", lambda x: x):
            results["dino_local_center"] = _engine_steps("dino", Path(shards), Path(out) / f"lc-{rank}")
        results["bn"] = _bn_rank_check(rank)
        torch.save(results, Path(out) / f"rank{rank}.pt")
    finally:
        torch.distributed.destroy_process_group()


@pytest.fixture(scope="module")
def two_ranks(shards, tmp_path_factory) -> list[dict]:
    """Every method's STEPS steps on 2 gloo processes (one start for all of them)."""
    out = tmp_path_factory.mktemp("two-ranks")
    fork_ranks(_rank_main, free_port(), str(shards), str(out))
    results = []
    for r in range(2):
        results.append(torch.load(out / f"rank{r}.pt", weights_only=False))
        (out / f"rank{r}.pt").unlink()  # kept in memory; the module's tmp space is not
    return results


@pytest.fixture(scope="module")
def one_rank(shards, tmp_path_factory) -> dict:
    assert "RANK" not in os.environ and not dist.is_dist()
    out = tmp_path_factory.mktemp("one-rank")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return {name: _engine_steps(name, shards, out / name) for name in METHODS}
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("name", list(METHODS))
def test_one_step_on_2_ranks_equals_one_step_on_1_rank_with_the_global_batch(name, two_ranks, one_rank):
    one, ranks = one_rank[name], [r[name] for r in two_ranks]
    assert one["world"] == 1 and [r["world"] for r in ranks] == [2, 2]
    # recipe batch_size is global: same lr, each rank takes half the batch
    assert one["batch_per_rank"] == 2 * B and [r["batch_per_rank"] for r in ranks] == [B, B]
    assert ranks[0]["peak_lr"] == ranks[1]["peak_lr"] == one["peak_lr"] > 0
    if name not in FROZEN_BN:  # sync_bn: every BN of the 2 ranks is global, one process keeps plain BN
        assert ranks[0]["sync_bn"] == ["GlooSyncBatchNorm"] and "GlooSyncBatchNorm" not in one["sync_bn"]
    # the logged loss is the global batch's (mean over ranks), the same on every rank
    assert ranks[0]["losses"] == ranks[1]["losses"]
    torch.testing.assert_close(torch.tensor(ranks[0]["losses"]), torch.tensor(one["losses"]), rtol=1e-4, atol=1e-5)
    moved = 0
    for key, value in one["after"].items():
        if name == "swav" and key in PER_RANK:
            continue
        if not value.is_floating_point():
            assert torch.equal(ranks[0]["after"][key], value), key  # queue pointers, BN batch counts
            continue
        # every parameter and buffer identical on both ranks (DDP, broadcast queue/bank, EMA, SyncBN)
        assert torch.equal(ranks[0]["after"][key], ranks[1]["after"][key]), key
        if key in ZERO_UPDATES.get(name, ()):
            for run in (one, ranks[0]):
                assert (run["after"][key] - run["before"][key]).norm() < 1e-6, key
            continue
        # ... and equal to one process's: compared as updates, which are small next to the weights.
        # Float summation order differs (per-rank partial sums): see UPDATE_TOLERANCE.
        assert _update_error(ranks[0], one, key) <= UPDATE_TOLERANCE, key
        moved += bool(torch.any(value != one["before"][key]))
    assert moved > 10  # the step did change the network (not a vacuous comparison)


def test_queue_and_bank_hold_the_global_keys_identically_on_both_ranks(two_ranks, one_rank):
    """After STEPS steps: MoCo enqueued STEPS x 2B keys at the same columns on both ranks, AdCo's
    bank took the same averaged gradient steps (also covered field by field above)."""
    for name, key in (("moco_v2", "queue"), ("adco", "bank"), ("adco", "bank_velocity")):
        a, b, one = two_ranks[0][name]["after"][key], two_ranks[1][name]["after"][key], one_rank[name]["after"][key]
        assert torch.equal(a, b), (name, key)
        torch.testing.assert_close(a, one, rtol=1e-4, atol=1e-5)
    assert int(two_ranks[0]["moco_v2"]["after"]["queue_ptr"]) == STEPS * 2 * B
    assert not torch.equal(two_ranks[0]["adco"]["after"]["bank"], two_ranks[0]["adco"]["before"]["bank"])


def test_simclr_without_the_gather_is_a_different_objective(two_ranks, one_rank):
    """The control: the comparison above can fail. With method.gather=false each rank contrasts
    its own 2B views only, so the loss is not the global batch's."""
    ng, one = two_ranks[0]["simclr_no_gather"], one_rank["simclr"]
    assert abs(ng["losses"][0] - one["losses"][0]) > 0.1
    # ... and the updates: most tensors off by far more than UPDATE_TOLERANCE (measured: median 0.34)
    errors = sorted(_update_error(ng, one, key) for key, value in one["after"].items() if value.is_floating_point())
    assert errors[len(errors) // 2] > 5 * UPDATE_TOLERANCE, errors


def test_dino_centre_without_the_all_reduce_is_not_the_global_batch_mean(two_ranks, one_rank):
    """The control for DINO: from each rank's own teacher batch, the centre differs between the
    ranks and from one process's, by more than the comparison above allows."""
    local, one = [r["dino_local_center"] for r in two_ranks], one_rank["dino"]
    assert not torch.equal(local[0]["after"]["center"], local[1]["after"]["center"])
    assert min(_update_error(r, one, "center") for r in local) > 2 * UPDATE_TOLERANCE


def test_swav_state_of_2_ranks_loads_into_1_with_an_empty_queue(two_ranks, capsys):
    """Resume with another world size: SwAV's per-rank queue shard has another length; the
    rest of the state loads, the queue starts empty (with a warning) instead of failing."""
    from sslctl.methods import build_method
    from sslctl.recipes import load_recipe

    state = two_ranks[0]["swav"]["after"]
    m = build_method(load_recipe("swav", variant="small", overrides=[*TINY, *METHODS["swav"]]))
    assert state["queue"].shape[1] * 2 == m.queue.shape[1]  # each of 2 ranks held half
    m.load_state_dict(state)
    assert "SwAV queue" in capsys.readouterr().err and not m.queue.any()
    assert torch.equal(m.prototypes.weight, state["prototypes.weight"])


def test_gloo_sync_batchnorm_equals_batchnorm_on_the_global_batch(two_ranks):
    g = torch.Generator().manual_seed(7)
    x_all, w_out = torch.randn(2 * B, 3, 5, 5, generator=g) * 3 + 1, torch.randn(2 * B, 3, 5, 5, generator=g)
    bn = nn.BatchNorm2d(3)
    x = x_all.clone().requires_grad_(True)
    y = bn(x)
    (y * w_out).mean().backward()  # = the mean of the 2 ranks' losses
    for rank, r in enumerate(two_ranks):
        got = r["bn"]
        assert got["type"] == "GlooSyncBatchNorm"
        mine = slice(rank * B, (rank + 1) * B)
        torch.testing.assert_close(got["y"], y.detach()[mine], rtol=1e-5, atol=1e-5)
        # the input gradient is of the SUM of the ranks' losses (DDP's averaging then halves it)
        torch.testing.assert_close(got["x_grad"], 2 * x.grad[mine], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(got["w_grad"], bn.weight.grad, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(got["b_grad"], bn.bias.grad, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(got["running_mean"], bn.running_mean)
        torch.testing.assert_close(got["running_var"], bn.running_var)


# ------------------------------------------------------------------------------ one process: no collectives


def test_world_size_1_never_calls_a_collective(shards, tmp_path, monkeypatch):
    """Without a process group every helper is the identity and a whole pretrain + embed runs:
    any collective would raise here."""
    def forbidden(*args, **kwargs):
        raise AssertionError("a collective was called at world size 1")

    for fn in ("all_reduce", "all_gather", "broadcast", "barrier", "all_gather_object", "init_process_group"):
        monkeypatch.setattr(torch.distributed, fn, forbidden)
    x = torch.randn(3, 2)
    assert dist.world_size() == 1 and dist.rank() == 0 and not dist.init_from_env("cpu")
    assert torch.equal(dist.gather_no_grad(x), x) and dist.gather_with_grad(x) is x
    assert torch.equal(dist.all_reduce_mean(x.clone()), x) and torch.equal(dist.broadcast(x.clone()), x)
    bn = nn.Sequential(nn.BatchNorm2d(2))
    assert dist.convert_sync_batchnorm(bn) is bn and type(bn[0]) is nn.BatchNorm2d

    from sslctl.embed import embed
    from sslctl.recipes import load_recipe
    from sslctl.train import pretrain

    cfg = load_recipe("simclr", variant="small", overrides=[*TINY, "method.sync_bn=true"])
    run = pretrain(shards, cfg, tmp_path / "run", device="cpu", workers=0, max_steps=2, amp=False)
    feats = embed(run, shards, device="cpu", workers=0, bf16=False)
    assert feats.is_file()


# ------------------------------------------------------------------------------ the launcher


def test_torchrun_command_line():
    from sslctl.launch import _parse, torchrun_args

    args = torchrun_args(2, "1", None, None, ["pretrain", "shards", "--nproc", "2", "--recipe", "simclr"])
    parsed = _parse(args)
    assert parsed.standalone and parsed.nproc_per_node == "2" and parsed.module and parsed.training_script == "sslctl"
    assert parsed.training_script_args == ["pretrain", "shards", "--nproc", "2", "--recipe", "simclr"]
    assert "SIGUSR1" in parsed.signals_to_handle.split(",")
    with pytest.raises(UserError, match="--rdzv-endpoint"):
        torchrun_args(4, "2", None, None, ["pretrain"])
    os.environ["SLURM_JOB_ID"] = "4242"
    try:
        parsed = _parse(torchrun_args(4, "2", "node17:29500", None, ["embed", "run", "shards"]))
    finally:
        del os.environ["SLURM_JOB_ID"]
    assert not parsed.standalone and parsed.nnodes == "2" and parsed.rdzv_backend == "c10d"
    assert parsed.rdzv_endpoint == "node17:29500" and parsed.rdzv_id == "4242"


def test_embed_on_2_processes_writes_the_same_file_as_one(shards, tmp_path):
    """`sslctl embed --nproc 2` (torch.distributed.run): the ranks share the 5 shards, rank 0
    assembles; the file equals the one-process embed, rows in the shards' order."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    from sslctl.embed import embed

    args = [TINY_RESNET, str(shards), "--weights", "random", "--input-size", "16", "--workers", "0",
            "--device", "cpu", "--no-bf16"]
    one = embed(TINY_RESNET, shards, weights="random", input_size=16, workers=0, device="cpu",
                bf16=False, out=tmp_path / "one.safetensors")
    done = _run(_cli("embed", *args, "--out", str(tmp_path / "two.safetensors"), nproc=2))
    assert done.returncode == 0, done.stderr
    assert done.stdout == f"{tmp_path / 'two.safetensors'}\n"  # one line, from rank 0
    assert "x 2 processes" in done.stderr
    a, b = load_file(str(one)), load_file(str(tmp_path / "two.safetensors"))
    assert a.keys() == b.keys() == {"train.features", "train.labels", "test.features", "test.labels"}
    for key in a:
        assert torch.equal(a[key], b[key]), key
    with safe_open(str(one), "pt") as f, safe_open(str(tmp_path / "two.safetensors"), "pt") as g:
        assert f.metadata()["splits"] == g.metadata()["splits"]
    assert not (tmp_path / "two.safetensors.parts").exists()


def test_a_user_error_in_the_processes_exits_2_with_the_message(shards, tmp_path):
    done = _run(_cli("pretrain", str(shards), "--recipe", "simclr", "--out", str(tmp_path / "run"), "--device", "cpu",
                     "--batch-size", "9", "--set", "augment.crop_size=8", "--set", f"encoder.name={TINY_RESNET}", nproc=2))
    assert done.returncode == 2, done.stderr
    assert "not divisible by the 2 processes" in done.stderr


# ------------------------------------------------------------------------------ SLURM scripts

SLURM = REPO / "shell" / "slurm"
RUN_TINY = ["--device", "cpu", "--batch-size", "16", "--set", f"encoder.name={TINY_RESNET}", "--set", "augment.crop_size=16",
            "--set", "method.queue_size=64",
            "--log-every", "1", "--seed", "3", "--workers", "0", "--no-bf16", "--max-steps", "10"]  # crosses epoch 1's end (6 steps)


def _exact(run_dir: Path) -> list[dict]:
    keys = ("step", "epoch", "loss", "lr", "z_std")
    return [{k: v for k, v in json.loads(line).items() if k in keys} for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _fake_slurm(tmp_path: Path) -> dict:
    """`srun` runs its command here; `scontrol` names this host and logs requeues."""
    bin_ = tmp_path / "bin"
    bin_.mkdir()
    (bin_ / "srun").write_text('#!/usr/bin/env bash\nwhile [[ $1 == --* ]]; do shift; done\nexec "$@"\n')
    (bin_ / "scontrol").write_text(
        '#!/usr/bin/env bash\necho "$*" >> "$FAKE_SLURM_LOG"\n[ "$1 $2" = "show hostnames" ] && echo localhost\nexit 0\n')
    for f in bin_.iterdir():
        f.chmod(0o755)
    return {"PATH": f"{bin_}:{os.environ['PATH']}", "FAKE_SLURM_LOG": str(tmp_path / "scontrol.log"), "SLURM_JOB_ID": "77",
            "SLURM_JOB_NODELIST": "localhost", "SLURM_JOB_NUM_NODES": "1", "NPROC": "2", "PORT": str(free_port()),
            "SSLCTL": f"{sys.executable} -m sslctl"}


def test_batch_scripts_parse_and_pass_shellcheck():
    scripts = sorted(SLURM.glob("*.sbatch"))
    assert [s.name for s in scripts] == ["embed.sbatch", "eval_array.sbatch", "pretrain.sbatch"]
    for script in scripts:
        assert subprocess.run(["bash", "-n", str(script)]).returncode == 0, script
        assert "#SBATCH" in script.read_text()
    if shutil.which("shellcheck"):
        done = subprocess.run(["shellcheck", *map(str, scripts)], capture_output=True, text=True)
        assert done.returncode == 0, done.stdout


@pytest.mark.slow
def test_usr1_to_the_batch_script_checkpoints_requeues_and_the_requeued_job_resumes_exactly(shards, tmp_path, capfd):
    """pretrain.sbatch with a fake srun/scontrol around a real 2-process run (`--nproc 2`):
    USR1 (SLURM's time-limit warning) -> SIGTERM to torchrun -> both ranks stop at the same step,
    rank 0 writes the checkpoint with both ranks' RNG states -> `scontrol requeue 77`. Running the
    script again (the requeued job) resumes: the losses equal an uninterrupted 2-process run's.
    Then a resume with ONE process warns and still finishes."""
    reference = tmp_path / "reference"  # the same run on 2 ranks, never interrupted
    cli_on_forked_ranks("pretrain", str(shards), "--recipe", "moco_v2", "--out", str(reference), *RUN_TINY, nprocs=2)
    assert [m["step"] for m in _exact(reference)] == list(range(1, 11))

    env = {**os.environ, **ENV, **_fake_slurm(tmp_path)}
    run = tmp_path / "run"
    job = ["bash", str(SLURM / "pretrain.sbatch"), str(shards), str(run), "moco_v2", *RUN_TINY]
    proc = subprocess.Popen(job, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.monotonic() + 300
    while not ((run / "metrics.jsonl").exists() and len((run / "metrics.jsonl").read_text().splitlines()) >= 2):
        assert proc.poll() is None, proc.communicate()[1]
        assert time.monotonic() < deadline
        time.sleep(0.05)
    proc.send_signal(signal.SIGUSR1)
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr
    assert "got SIGUSR1" in stderr and "requeueing job 77" in stderr
    assert (tmp_path / "scontrol.log").read_text().splitlines() == ["show hostnames localhost", "requeue 77"]
    assert stdout == ""  # no RUN_DIR: the run did not finish
    state = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    assert 2 <= state["step"] < 10 and len(_exact(run)) == state["step"]
    assert state["world_size"] == 2 and len(state["rng"]) == 2
    assert not torch.equal(state["rng"][0]["torch"], state["rng"][1]["torch"])  # every rank's own stream
    shutil.copytree(run, tmp_path / "one-process")

    again = run_bounded(job, env=env)  # the requeued job
    assert again.returncode == 0, again.stderr
    assert again.stdout == f"{run}\n"
    assert (tmp_path / "scontrol.log").read_text().count("requeue") == 1
    assert _exact(run) == _exact(reference)  # same losses as the uninterrupted run

    capfd.readouterr()
    cli_on_forked_ranks("pretrain", str(shards), "--recipe", "moco_v2", "--out", str(tmp_path / "one-process"), *RUN_TINY)
    assert "written by 2 processes, this run has 1" in " ".join(capfd.readouterr().err.split())
    assert [m["step"] for m in _exact(tmp_path / "one-process")] == list(range(1, 11))


def test_eval_array_task_embeds_its_encoder_and_runs_knn(shards, tmp_path):
    """eval_array.sbatch as array task 1 of a 2-line list; a rerun skips the finished task."""
    (tmp_path / "encoders.txt").write_text("resnet18\nresnet18\n")  # random-weight floors stand in for runs
    env = {**os.environ, **ENV, "SLURM_ARRAY_TASK_ID": "1", "SSLCTL": f"{sys.executable} -m sslctl", "NPROC": "1",
           "EMBED_ARGS": "--weights random --small-stem --input-size 16 --device cpu --workers 0",
           "KNN_ARGS": "--k 5 --temperature 0.07 --device cpu"}
    job = ["bash", str(SLURM / "eval_array.sbatch"), str(tmp_path / "encoders.txt"), str(shards), str(tmp_path / "results")]
    done = run_bounded(job, env=env)
    assert done.returncode == 0, done.stderr
    lines = [json.loads(line) for line in (tmp_path / "results" / "knn-1.jsonl").read_text().splitlines()]
    assert len(lines) == 1 and lines[0]["k"] == 5 and 10 < lines[0]["top1"] <= 100
    assert lines[0]["features"].endswith("features-1.safetensors") and lines[0]["n_eval"] == 48
    assert not (tmp_path / "results" / "knn-0.jsonl").exists()
    again = run_bounded(job, env=env)
    assert again.returncode == 0 and "task 1 skipped" in again.stderr
