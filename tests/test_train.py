"""The training engine (sslctl/train.py, sslctl/checkpoint.py) and `sslctl pretrain`.

Real shards made by `sslctl shard` from the embedded Fashion-MNIST subset, real methods, real
subprocesses killed with real signals. The model is kept tiny (tests.realrun.TinyResNet at 16 px,
batch 16, small queues) so every run takes seconds on a 2-core CPU; the one test of the encoder
export into torchvision's resnet18 trains ResNet-18 (small stem).
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from sslctl import checkpoint as ckpt
from tests.conftest import cli_on_forked_ranks, run_bounded, run_cli
from tests.realrun import TINY_RESNET

RESNET18 = [  # a seconds-long run: 16 px crops, batch 16, a 64-key queue / bank, 2 BN splits
    "--batch-size", "16", "--set", "augment.crop_size=16", "--set", "method.queue_size=64",
    "--set", "method.bn_splits=2", "--log-every", "1", "--seed", "3",
]
# ... on the tests' tiny ResNet (0.44M parameters: a step ~1/19 of ResNet-18's, a checkpoint
# ~2 MB instead of ~45 MB), for every test that is not about the network
TINY_NET = ["--set", f"encoder.name={TINY_RESNET}"]
TINY = [*RESNET18, *TINY_NET]
TINY_CFG = [f"encoder.name={TINY_RESNET}"]  # the same, as recipe overrides
ENV = {"OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}

# Keys of a metrics line that must be identical between a resumed and an uninterrupted run
# (timings are not).
EXACT_KEYS = ("step", "epoch", "loss", "lr", "z_std", "monitor", "knn_top1_k20", "knn_top1_k96")


@pytest.fixture(scope="session")
def shards(tiny_shards) -> Path:
    """96 train + 48 test images of the embedded set (conftest.py): 6 steps per epoch at batch 16,
    so runs cross epoch boundaries within seconds."""
    return tiny_shards()


def _pretrain_args(shards: Path, out: Path, *args: str, recipe: str = "moco_v2") -> list[str]:
    return ["pretrain", str(shards), "--recipe", recipe, "--out", str(out), *TINY, *args]


def _pretrain(shards: Path, out: Path, *args: str, recipe: str = "moco_v2") -> list:
    return [sys.executable, "-m", "sslctl", *_pretrain_args(shards, out, *args, recipe=recipe)]


def _run(cmd: list, timeout: float = 600, **kw) -> subprocess.CompletedProcess:
    return run_bounded(cmd, timeout=timeout, env={**os.environ, **ENV}, **kw)


def _metrics(run_dir: Path) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if k in EXACT_KEYS} for line in lines]


def _wait_for_steps(proc: subprocess.Popen, metrics: Path, steps: int, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= steps:
            return
        if proc.poll() is not None:
            pytest.fail(f"the run ended (rc {proc.returncode}) before step {steps}: {proc.stderr.read()}")
        time.sleep(0.02)
    proc.kill()
    pytest.fail(f"no step {steps} within {timeout} s")


@pytest.fixture(scope="module")
def reference(shards, tmp_path_factory) -> Path:
    """An uninterrupted 14-step run (crosses the first epoch's end at step 6), 2 loader workers."""
    out = tmp_path_factory.mktemp("reference") / "run"
    cli_on_forked_ranks(*_pretrain_args(shards, out, "--max-steps", "14", "--workers", "2", "--checkpoint-every", "2"))
    return out


# ------------------------------------------------------------------------------ resume


def test_sigkill_then_resume_reproduces_the_uninterrupted_losses(shards, reference, tmp_path):
    out = tmp_path / "run"
    cmd = _pretrain(shards, out, "--max-steps", "14", "--workers", "2", "--checkpoint-every", "2")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, **ENV})
    _wait_for_steps(proc, out / "metrics.jsonl", 5)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    killed_at = torch.load(out / "checkpoints" / "last.pt", weights_only=True)["step"]
    assert 4 <= killed_at < 14  # a mid-way checkpoint, not the finished run

    resumed = _run(cmd)
    assert resumed.returncode == 0, resumed.stderr
    assert f"resuming {out / 'checkpoints' / 'last.pt'} at step {killed_at}" in resumed.stderr.replace("\n", " ")
    # The file equals an uninterrupted run's: lines past the checkpoint were dropped, not repeated.
    assert _metrics(out) == _metrics(reference)
    assert [m["step"] for m in _metrics(out)] == list(range(1, 15))


def test_a_second_run_on_the_same_directory_is_refused_and_a_killed_ones_lock_does_not_block(shards, tmp_path):
    """Two pretrains on one --out interleaved their metrics and the last writer won the checkpoint:
    the second is now exit 2 naming the holder. The lock dies with its process (a POSIX lock), so after
    a kill -9 the same command resumes."""
    out = tmp_path / "run"
    first = subprocess.Popen(_pretrain(shards, out, "--max-steps", "100000", "--workers", "0", "--checkpoint-every", "1"),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, **ENV})
    try:
        _wait_for_steps(first, out / "metrics.jsonl", 2)
        second = _run(_pretrain(shards, out, "--max-steps", "3", "--workers", "0"))
        assert first.poll() is None, "the first run ended before the second started"
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=60)
    assert second.returncode == 2, second.stderr
    said = " ".join(second.stderr.split())
    assert f"{out}: the run directory is in use by sslctl pid {first.pid}" in said and "Traceback" not in said, said
    killed_at = torch.load(out / "checkpoints" / "last.pt", weights_only=True)["step"]
    again = _run(_pretrain(shards, out, "--max-steps", str(killed_at + 1), "--workers", "0"))
    assert again.returncode == 0, again.stderr
    assert f"at step {killed_at}" in " ".join(again.stderr.split())


def test_sigterm_saves_exits_143_and_resumes_exactly(shards, reference, tmp_path):
    out = tmp_path / "run"
    cmd = _pretrain(shards, out, "--max-steps", "14", "--workers", "2", "--checkpoint-every", "100")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, **ENV})
    _wait_for_steps(proc, out / "metrics.jsonl", 3)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 143, stderr
    assert stdout == ""  # no RUN_DIR: the run did not finish
    assert "SIGTERM" in stderr and "Traceback" not in stderr
    state = torch.load(out / "checkpoints" / "last.pt", weights_only=True)
    assert 3 <= state["step"] < 14  # saved at the signal, not by --checkpoint-every
    assert len(_metrics(out)) == state["step"]

    resumed = _run(cmd)
    assert resumed.returncode == 0, resumed.stderr
    assert _metrics(out) == _metrics(reference)


def test_sigterm_during_adco_ad_init_exits_143_at_the_next_batch(mini_shards, tmp_path):
    """A batch system's SIGTERM during a method's setup (AdCo's ad_init: here 256 batches) stops
    it at the next batch, not after the whole setup (beyond the grace period). Nothing is saved:
    a half-filled bank cannot be resumed, the next run starts the setup again."""
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "sslctl", "pretrain", str(mini_shards), "--recipe", "adco", "--out", str(out),
           "--batch-size", "16", "--set", "augment.crop_size=16", "--set", "method.bank_size=4096",
           "--set", "method.bn_splits=2", *TINY_NET, "--workers", "0", "--device", "cpu"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, **ENV})
    seen = []
    for line in proc.stderr:  # logged once the signal handlers are in place
        seen.append(line)
        if "setup pass over the data" in line:
            break
    proc.send_signal(signal.SIGTERM)
    stdout, rest = proc.communicate(timeout=120)
    stderr = "".join(seen) + rest
    assert proc.returncode == 143, stderr
    assert stdout == "" and "Traceback" not in stderr
    assert "during the method's setup" in stderr and "ad_init: bank filled" not in stderr
    assert not (out / "checkpoints" / "last.pt").exists()


def test_sigint_saves_and_exits_130(shards, tmp_path):
    out = tmp_path / "run"
    cmd = _pretrain(shards, out, "--max-steps", "200", "--workers", "0")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, **ENV})
    _wait_for_steps(proc, out / "metrics.jsonl", 2)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr
    assert "SIGINT" in stderr and "Traceback" not in stderr
    assert torch.load(out / "checkpoints" / "last.pt", weights_only=True)["step"] >= 2


@pytest.mark.parametrize(
    "recipe, extra",
    [
        ("moco_v2", []),  # queue + pointer, key encoder, split BN
        ("adco", ["method.bank_size=64"]),  # adversarial bank + its velocity, ad_init (setup) before epoch 0
        ("byol", ["method.base_tau=0.9"]),  # EMA target, predictor
        ("simclr", []),  # LARS state
        ("simsiam", ["head.projector_hidden=[64, 64]", "head.projector_dim=64", "head.predictor_dim=64",
                     "schedule.warmup_epochs=1"]),  # the predictor's fixed-lr group through the warmup
        ("barlow_twins", ["head.projector_hidden=[64, 64]", "head.projector_dim=64"]),  # LARS with trust clip
        ("vicreg", ["head.projector_hidden=[64, 64]", "head.projector_dim=64"]),
        # centre, teacher, the temperature warm-up across the epoch end, last-layer freeze, clipping, wd schedule
        ("dino", ["head.prototypes=64", "head.projector_hidden=[64]", "augment.extra_crops=2", "augment.extra_crop_size=8",
                  "loss.warmup_teacher_temperature_epochs=3", "method.freeze_last_layer_epochs=0.5", "method.clip_grad=1.0",
                  "optim.weight_decay_end=0.1", "schedule.epochs=2"]),
        ("mocov3", ["head.projector_hidden=[64]", "head.predictor_hidden=[64]", "schedule.epochs=2"]),  # cosine momentum
    ],
)
def test_resume_is_exact_for_each_method(shards, tmp_path, recipe, extra):
    """In-process: 4 steps, then resume to 9 (across the epoch end at 6) == 9 uninterrupted steps,
    in the losses and in every tensor of the final checkpoint (model, method state, optimizer)."""
    from sslctl.recipes import load_recipe
    from sslctl.train import pretrain

    overrides = [*TINY_CFG, "augment.crop_size=16", "optim.batch_size=16", *extra]
    if recipe == "moco_v2":
        overrides += ["method.queue_size=64", "method.bn_splits=2"]
    cfg = load_recipe(recipe, variant="small", overrides=overrides)
    kw = dict(workers=0, log_every=1, seed=1)
    pretrain(shards, cfg, tmp_path / "a", max_steps=9, **kw)
    pretrain(shards, cfg, tmp_path / "b", max_steps=4, **kw)
    pretrain(shards, cfg, tmp_path / "b", max_steps=9, **kw)
    assert _metrics(tmp_path / "a") == _metrics(tmp_path / "b")
    a = torch.load(tmp_path / "a" / "checkpoints" / "last.pt", weights_only=True)
    b = torch.load(tmp_path / "b" / "checkpoints" / "last.pt", weights_only=True)
    assert a["step"] == b["step"] == 9 and a["epoch"] == b["epoch"] == 1 and a["position"] == b["position"] == 3
    for key, value in a["model"].items():
        assert torch.equal(value, b["model"][key]), key
    for pid, state in a["optimizer"]["state"].items():
        for key, value in state.items():
            assert torch.equal(value, b["optimizer"]["state"][pid][key]), (pid, key)


def test_batched_views_resume_exactly(shards, tmp_path, views="batch"):
    """--views batch (BatchViews on each batch in the loader's workers): each batch's views come
    from a seed of (seed, epoch, position), so 4 steps + resume to 9 equal 9 uninterrupted steps;
    and they are not the per-image views."""
    from sslctl.recipes import load_recipe
    from sslctl.train import pretrain

    cfg = load_recipe("moco_v2", variant="small", overrides=[*TINY_CFG, "augment.crop_size=16", "optim.batch_size=16",
                                                              "method.queue_size=64", "method.bn_splits=2"])
    kw = {"workers": 2, "log_every": 1, "seed": 1, "device": "cpu"}  # bitwise resume is a CPU promise
    pretrain(shards, cfg, tmp_path / "a", max_steps=9, views=views, **kw)
    pretrain(shards, cfg, tmp_path / "b", max_steps=4, views=views, **kw)
    pretrain(shards, cfg, tmp_path / "b", max_steps=9, views=views, **kw)
    pretrain(shards, cfg, tmp_path / "per-image", max_steps=9, views="per-image", **kw)
    batched, resumed, per_image = (_metrics(tmp_path / d) for d in ("a", "b", "per-image"))
    assert batched == resumed and len(batched) == 9
    assert [m["loss"] for m in batched] != [m["loss"] for m in per_image]
    assert all(np.isfinite(m["loss"]) for m in batched)


def _mixed_image_shards(tmp_path: Path) -> Path:
    """Shards of an image folder of gray and colour PNGs of different sizes (20-47 px)."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for i in range(40):
        h, w = rng.integers(20, 48, size=2)
        mode, shape = ("L", (h, w)) if i % 3 else ("RGB", (h, w, 3))
        folder = tmp_path / "images" / "train" / f"class{i % 2}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, size=shape, dtype=np.uint8), mode).save(folder / f"{i:03d}.png")
    assert run_cli("shard", str(tmp_path / "images"), str(tmp_path / "shards"), "--quiet").returncode == 0
    return tmp_path / "shards"


def test_auto_views_are_batched_for_one_small_size_and_per_image_otherwise(shards, tmp_path):
    """--views auto (the default): on 28 x 28 Fashion-MNIST the same run as --views batch, on
    an image folder of mixed sizes and channels the same run as --views per-image, loss for loss."""
    from sslctl.recipes import load_recipe
    from sslctl.train import pretrain

    cfg = load_recipe("moco_v2", variant="small", overrides=[*TINY_CFG, "augment.crop_size=16", "optim.batch_size=16",
                                                              "method.queue_size=64", "method.bn_splits=2"])
    kw = {"workers": 1, "log_every": 1, "seed": 1, "device": "cpu", "max_steps": 3}
    mixed = _mixed_image_shards(tmp_path)
    for data, twin in ((shards, "batch"), (mixed, "per-image")):
        pretrain(data, cfg, tmp_path / f"auto-{twin}", **kw)
        pretrain(data, cfg, tmp_path / twin, views=twin, **kw)
        auto, other = _metrics(tmp_path / f"auto-{twin}"), _metrics(tmp_path / twin)
        assert [m["loss"] for m in auto] == [m["loss"] for m in other] and len(auto) == 3, twin


def test_batched_views_take_images_of_mixed_sizes_and_channels(tmp_path, views="batch"):
    """An image folder of gray and colour images of different sizes: the loader hands BatchViews
    a list (sslctl.data.collate_images) and the run trains."""
    _mixed_image_shards(tmp_path)
    done = _run(_pretrain(tmp_path / "shards", tmp_path / "run", "--max-steps", "2", "--workers", "1",
                          "--views", views, "--variant", "small", "--device", "cpu"))
    assert done.returncode == 0, done.stderr
    assert f"views {views}" in " ".join(done.stderr.split())
    assert len(_metrics(tmp_path / "run")) == 2


def test_rerun_of_a_finished_run_is_a_no_op_and_a_changed_recipe_is_refused(shards, reference, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(reference, out)
    before = (out / "metrics.jsonl").read_text()
    code, stdout, stderr = _cli(capsys, *_pretrain(shards, out, "--max-steps", "14", "--workers", "2")[3:])
    assert code == 0, stderr
    assert stdout == f"{out}\n" and (out / "metrics.jsonl").read_text() == before

    code, stdout, stderr = _cli(capsys, *_pretrain(shards, out, "--max-steps", "14", "--set", "optim.lr=0.5")[3:])
    assert code == 2 and stdout == "" and "Traceback" not in stderr
    assert str(out / "recipe.toml") in stderr and "recipes/moco_v2.toml" in stderr
    assert "'optim.lr'" in stderr and "0.5" in stderr
    assert (out / "metrics.jsonl").read_text() == before  # untouched

    code, _, stderr = _cli(capsys, *_pretrain(shards, out, "--max-steps", "14", "--resume", "never")[3:])
    assert code == 2 and "--resume auto" in stderr


# ------------------------------------------------------------------------------ failures


def test_nan_loss_stops_with_the_step_and_keeps_the_last_good_checkpoint(shards, tmp_path):
    out = tmp_path / "run"
    done = _run(_pretrain(shards, out, "--max-steps", "20", "--checkpoint-every", "1", "--workers", "0",
                          "--set", "optim.lr=1e30", "--set", "optim.scaling=none"))
    assert done.returncode == 1, done.stderr
    assert "Traceback" not in done.stderr
    message = " ".join(done.stderr.split())
    state = torch.load(out / "checkpoints" / "last.pt", weights_only=True)
    bad_step = state["step"] + 1  # the checkpoint is the last step with a finite loss
    assert f"at step {bad_step} " in message and "learning rate" in message
    assert f"(step {state['step']}) is kept" in message
    assert all(np.isfinite(m["loss"]) for m in _metrics(out))
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())


def test_a_corrupt_shard_with_loader_workers_is_skipped_and_the_run_exits(shards, tmp_path):
    """A truncated shard read by loader workers: its missing samples are replaced and counted, the
    run finishes and the process exits (the workers ignore SIGTERM, so unless they are shut down
    the interpreter's exit waited on them forever)."""
    broken = tmp_path / "shards"
    shutil.copytree(shards, broken)
    tar = sorted(broken.glob("train-*.tar"))[0]
    os.truncate(tar, tar.stat().st_size // 2)
    done = _run(_pretrain(broken, tmp_path / "run", "--max-steps", "8", "--workers", "2"), timeout=180)
    assert done.returncode == 0, done.stderr
    assert f"{tar}: holds" in done.stderr and "replaced by others" in done.stderr and "skipped_shards 1" in done.stderr, done.stderr


def test_a_user_error_in_a_loader_worker_is_reported_as_sslctl_wrote_it():
    """torch re-raises a worker's exception with the worker's traceback as its message; the CLI
    prints the message alone."""
    from torch._utils import ExceptionWrapper

    from sslctl.errors import UserError, user_message

    try:
        raise UserError("x.tar: truncated shard (member '7.cls'); rerun `sslctl shard`\nsecond line")
    except UserError:
        wrapped = ExceptionWrapper(where="in DataLoader worker process 0")
    with pytest.raises(UserError) as raised:
        wrapped.reraise()
    assert "Traceback" in str(raised.value)
    assert user_message(raised.value) == "x.tar: truncated shard (member '7.cls'); rerun `sslctl shard`\nsecond line"


@pytest.mark.parametrize(
    "args, expected",
    [
        (["/nonexistent/shards", "--recipe", "moco_v2"], "no shards manifest"),
        (["SHARDS", "--recipe", "moco_v9"], "moco_v2"),  # the closest recipe name
        (["SHARDS", "--recipe", "moco_v2", "--set", "optim.lrr=0.1"], "Closest valid key: optim.lr"),
        (["SHARDS", "--recipe", "moco_v2", "--set", "optim.lr=fast"], "optim.lr"),
        (["SHARDS", "--recipe", "moco_v2", "--monitor", "val"], "has splits train, test"),
        (["SHARDS", "--recipe", "moco_v2", "--device", "tpu"], "--device"),
        (["SHARDS", "--recipe", "moco_v2", "--views", "gpu"], "expected one of auto, per-image, batch"),
        # batch-on-device was removed: batched views in the loader's workers beat it everywhere measured
        (["SHARDS", "--recipe", "moco_v2", "--views", "batch-on-device"], "--views batch-on-device: expected one of auto, per-image, batch"),
        (["SHARDS", "--recipe", "moco_v2", "--bogus-flag"], "--bogus-flag"),
    ],
)
def test_bad_inputs_exit_2_without_traceback(shards, tmp_path, capsys, args, expected):
    args = [str(shards) if a == "SHARDS" else a for a in args]
    code, stdout, stderr = _cli(capsys, "pretrain", *args, "--out", str(tmp_path / "run"), "--batch-size", "16", "--max-steps", "1")
    assert code == 2, stderr
    assert expected in stderr and "Traceback" not in stderr
    assert stdout == ""


def _cli(capsys, *args: str) -> tuple[int, str, str]:
    """`sslctl ARGS` in this process (the same main() as the console script): exit code, stdout,
    stderr with whitespace runs joined."""
    from sslctl.cli import main

    capsys.readouterr()
    argv = sys.argv
    sys.argv = ["sslctl", *args]
    try:
        main()
        code = 0
    except SystemExit as exit_:
        code = exit_.code or 0
    finally:
        sys.argv = argv
    captured = capsys.readouterr()
    return code, captured.out, " ".join(captured.err.split())


# ------------------------------------------------------------------------------ outputs


def test_a_warm_up_as_long_as_the_run_is_named_with_its_fix_and_the_workers_say_why(shards, tmp_path):
    """simclr's small variant warms up for 10 epochs: shortened to one, its lr never reaches the
    peak. The start line says so with the numbers and the --set that fixes it, and says how the
    loader workers were chosen."""
    common = ["--recipe", "simclr", "--batch-size", "16", "--set", "augment.crop_size=16", *TINY_NET, "--epochs", "1",
              "--max-steps", "1"]
    short = _run([sys.executable, "-m", "sslctl", "pretrain", str(shards), "--out", str(tmp_path / "a"), *common,
                  "--workers", "0"])
    assert short.returncode == 0, short.stderr
    said = " ".join(short.stderr.split())
    assert "the lr warm-up lasts 60 steps (schedule.warmup_epochs = 10) but this run ends at step 1" in said, said
    assert "--set schedule.warmup_epochs=0.02" in said and "0 loader workers (--workers)" in said, said
    fixed = _run([sys.executable, "-m", "sslctl", "pretrain", str(shards), "--out", str(tmp_path / "b"), *common,
                  "--set", "schedule.warmup_epochs=0"])
    assert fixed.returncode == 0, fixed.stderr
    assert "warm-up" not in fixed.stderr and "the cores less one, at most 16; --workers N to change" in fixed.stderr


def test_outputs_stdout_stdin_encoder_and_monitor(shards, tmp_path):
    out = tmp_path / "run"
    done = run_cli("pretrain", "-", "--recipe", "moco_v2", "--out", str(out), *RESNET18, "--epochs", "2",
                   "--monitor", "test", "--workers", "1", stdin=f"{shards / 'manifest.json'}\n", env=ENV)
    assert done.returncode == 0, done.stderr
    assert done.stdout == f"{out}\n"  # stdout carries RUN_DIR only

    # recipe.toml: the resolved recipe, with the overrides
    import tomllib

    recipe = tomllib.loads((out / "recipe.toml").read_text())
    assert recipe["recipe"]["variant"] == "small" and recipe["schedule"]["epochs"] == 2
    assert recipe["optim"]["batch_size"] == 16 and recipe["augment"]["crop_size"] == 16

    # metrics: one line per step (log-every 1) plus a kNN monitor line per epoch
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [m for m in lines if "loss" in m]
    monitors = [m for m in lines if "monitor" in m]
    assert [m["step"] for m in steps] == list(range(1, 13))
    assert [m["epoch"] for m in steps] == [0] * 6 + [1] * 6
    assert all({"lr", "images_per_s", "data_wait_pct", "z_std"} <= set(m) for m in steps)
    assert [(m["step"], m["epoch"]) for m in monitors] == [(6, 0), (12, 1)]
    assert all(0 <= m["knn_top1_k20"] <= 100 and 0 <= m["knn_top1_k96"] <= 100 for m in monitors)  # k=200 capped by the 96-image bank
    assert "kNN top-1 on test" in done.stderr and "ETA" in done.stderr and "data-wait" in done.stderr

    # the lr follows the recipe's per-epoch cosine from its batch-scaled peak
    peak = 0.06 * 16 / 512
    assert steps[0]["lr"] == pytest.approx(peak) and steps[6]["lr"] == pytest.approx(peak * 0.5 * (1 + np.cos(np.pi / 2)))

    # encoder.safetensors loads strictly into torchvision's resnet18 with the small stem and
    # holds the trained backbone (equal to the checkpoint's)
    import torchvision
    from safetensors.torch import load_file

    from sslctl.encoders import apply_small_stem, strip_classifier

    model = torchvision.models.resnet18()
    apply_small_stem(model)
    strip_classifier(model)
    weights = load_file(str(out / "encoder.safetensors"))
    model.load_state_dict(weights, strict=True)
    state = torch.load(out / "checkpoints" / "last.pt", weights_only=True)
    assert state["step"] == 12 and state["epoch"] == 2 and state["position"] == 0
    for key, value in weights.items():
        assert torch.equal(value, state["model"][f"backbone.{key}"].contiguous()), key
    assert not torch.equal(weights["conv1.weight"], _initial_conv1(recipe))


def _initial_conv1(recipe: dict) -> torch.Tensor:
    """The backbone's conv1 at initialisation (seed 3, as RESNET18): training must have moved it."""
    from sslctl.methods import build_method

    torch.manual_seed(3)
    return build_method(recipe).backbone.conv1.weight.detach()


# ------------------------------------------------------------------------------ checkpoint helpers


def test_rng_state_round_trip_through_a_weights_only_file(tmp_path):
    torch.manual_seed(1), np.random.seed(2), random.seed(3)
    np.random.normal()  # leaves a cached gaussian in numpy's state
    ckpt.save(tmp_path / "c.pt", {"rng": [ckpt.rng_state()]})
    expected = (torch.rand(3), np.random.normal(size=3), [random.random() for _ in range(3)])
    torch.manual_seed(9), np.random.seed(9), random.seed(9)
    ckpt.set_rng_state(ckpt.load(tmp_path / "c.pt")["rng"][0])
    assert torch.equal(torch.rand(3), expected[0])
    assert np.array_equal(np.random.normal(size=3), expected[1])
    assert [random.random() for _ in range(3)] == expected[2]


def test_first_difference_names_the_first_differing_dotted_key():
    a = {"optim": {"lr": 0.1, "momentum": 0.9}, "schedule": {"epochs": 10}}
    assert ckpt.first_difference(a, a) is None
    assert ckpt.first_difference(a, {**a, "optim": {"lr": 0.2, "momentum": 0.9}}) == ("optim.lr", 0.1, 0.2)
    assert ckpt.first_difference(a, {**a, "schedule": {}}) == ("schedule.epochs", 10, "<absent>")

    # a key added later: absent from the saved recipe counts as the behaviour before it existed
    implied = {"method.fused_views": True}
    saved, now = {"method": {"t": 0.5}}, {"method": {"t": 0.5, "fused_views": True}}
    assert ckpt.first_difference(saved, now, implied=implied) is None
    key, was, value = ckpt.first_difference(saved, {"method": {"t": 0.5, "fused_views": False}}, implied=implied)
    assert key == "method.fused_views" and "True" in was and value is False
    assert ckpt.first_difference(saved, now) == ("method.fused_views", "<absent>", True)  # unlisted: refused


def test_a_run_saved_before_a_recipe_key_existed_resumes_with_its_old_behaviour(shards, tmp_path, capsys):
    """A SimCLR run whose checkpoint predates `method.fused_views` (its saved recipe lacks the key)
    resumes with today's default (true: both views were always one batch) and is refused with false."""
    out = tmp_path / "run"
    args = ["pretrain", str(shards), "--recipe", "simclr", "--out", str(out), "--batch-size", "16",
            "--set", "augment.crop_size=16", *TINY_NET, "--workers", "0", "--quiet"]
    code, _, stderr = _cli(capsys, *args, "--max-steps", "2")
    assert code == 0, stderr
    path = out / "checkpoints" / "last.pt"
    state = torch.load(path, weights_only=True)
    old = "\n".join(line for line in state["recipe"].splitlines() if not line.startswith("fused_views"))
    assert old != state["recipe"] and "fused_views" not in old
    ckpt.save(path, {**state, "recipe": old})

    code, _, stderr = _cli(capsys, *args, "--max-steps", "3", "--set", "method.fused_views=false")
    assert code == 2 and "'method.fused_views'" in stderr and "before the key existed" in stderr
    code, stdout, stderr = _cli(capsys, *args, "--max-steps", "3")
    assert code == 0 and stdout == f"{out}\n", stderr
    assert torch.load(path, weights_only=True)["step"] == 3


def test_truncate_metrics_drops_lines_past_the_step_and_a_torn_last_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\n{"step": 2}\n{"step": 2, "monitor": "test"}\n{"step": 3}\n{"st')
    ckpt.truncate_metrics(path, 2)
    assert path.read_text() == '{"step": 1}\n{"step": 2}\n{"step": 2, "monitor": "test"}\n'


def test_a_corrupt_checkpoint_is_a_user_error(tmp_path):
    from sslctl.errors import UserError

    (tmp_path / "last.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="cannot read the checkpoint"):
        ckpt.load(tmp_path / "last.pt")


def test_two_process_run_splits_the_global_batch_and_writes_once(shards, tmp_path):
    """torchrun with 2 gloo processes: batch 16 global = 8 per process, one RUN_DIR line on
    stdout (rank 0), one metrics line per step, both ranks' RNG states in the checkpoint."""
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "sslctl", "pretrain", str(shards), "--recipe", "moco_v2", "--out", str(out), *TINY,
           "--max-steps", "3", "--workers", "0"]
    done = _run(cmd)
    assert done.returncode == 0, done.stderr
    assert done.stdout == f"{out}\n"
    assert "batch 16 global = 8 per process" in done.stderr
    assert [m["step"] for m in _metrics(out)] == [1, 2, 3]
    state = torch.load(out / "checkpoints" / "last.pt", weights_only=True)
    assert state["world_size"] == 2 and len(state["rng"]) == 2
    assert not torch.equal(state["rng"][0]["torch"], state["rng"][1]["torch"])  # per-rank streams


# ------------------------------------------------------------------------------ extension points


from sslctl.methods.simclr import SimCLR  # noqa: E402
from sslctl.optim import ParamGroup  # noqa: E402


class NoDecayHeadSimCLR(SimCLR):
    """SimCLR declaring two things a stage or a new method may need: its projector without weight
    decay (as a ViT's pos_embed / cls_token), and initial weights (counted: fresh start only)."""

    initial_weights_loaded = 0

    def param_groups(self) -> list[ParamGroup]:
        return self.param_groups_apart(lambda name: name.startswith("projector."), weight_decay=0.0)

    def load_initial_weights(self) -> None:
        type(self).initial_weights_loaded += 1


def _simclr_cfg(*overrides: str) -> dict:
    from sslctl.recipes import load_recipe

    return load_recipe("simclr", variant="small", overrides=[*TINY_CFG, "augment.crop_size=16", "optim.batch_size=16", *overrides])


def test_a_methods_declared_groups_and_initial_weights_reach_the_engine(shards, tmp_path):
    from sslctl.run_options import RunOptions
    from sslctl.train import Engine

    cfg = _simclr_cfg()
    cfg["recipe"]["method"] = "tests.test_train:NoDecayHeadSimCLR"
    options = RunOptions(device="cpu", workers=0, max_steps=2, log_every=1, amp=False)
    NoDecayHeadSimCLR.initial_weights_loaded = 0
    engine = Engine(shards, cfg, tmp_path / "run", options)
    assert NoDecayHeadSimCLR.initial_weights_loaded == 1
    head = {id(p) for p in engine.method.projector.parameters()}
    groups = [({id(p) for p in g["params"]}, g["weight_decay"], g["adapt"]) for g in engine.optimizer.param_groups]
    wd = cfg["optim"]["weight_decay"]
    # the backbone as [optim] says (LARS: 1-D tensors without decay and trust ratio), the head without decay
    assert [(w, a) for _, w, a in groups] == [(wd, True), (0.0, False), (0.0, True), (0.0, False)]
    assert groups[2][0] | groups[3][0] == head and all(p.ndim > 1 for p in engine.method.projector.parameters()
                                                        if id(p) in groups[2][0])
    engine.run()
    # a resume restores the checkpoint (optimizer groups included) and loads no initial weights
    resumed = Engine(shards, cfg, tmp_path / "run", RunOptions(device="cpu", workers=0, max_steps=3, log_every=1, amp=False))
    assert NoDecayHeadSimCLR.initial_weights_loaded == 1 and resumed.step == 2
    assert [g["weight_decay"] for g in resumed.optimizer.param_groups] == [wd, 0.0, 0.0, 0.0]
    resumed.run()
    assert [m["step"] for m in _metrics(tmp_path / "run")] == [1, 2, 3]


def test_the_monitor_callback_gets_the_features_of_both_splits(shards, tmp_path):
    from sslctl.errors import UserError
    from sslctl.train import pretrain

    calls = []

    def monitor(bank, bank_labels, queries, query_labels, *, split):
        calls.append((bank.shape, bank_labels.tolist(), queries.shape, query_labels.shape, split))
        return {"mean_norm": bank.norm(dim=1).mean().item()}, "mean feature norm"

    cfg = _simclr_cfg()
    kw = dict(device="cpu", workers=0, seed=3, amp=False)
    pretrain(shards, cfg, tmp_path / "run", monitor=monitor, monitor_split="test", max_steps=12, **kw)
    assert len(calls) == 2  # one per epoch end (6 steps per epoch)
    bank_shape, bank_labels, query_shape, query_labels_shape, split = calls[0]
    # 128: TinyResNet's feature_dim
    assert bank_shape == (96, 128) and query_shape == (48, 128) and query_labels_shape == (48,) and split == "test"
    assert sorted(set(bank_labels)) == list(range(10))  # the train split's labels, in stored order
    lines = [m for m in (json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines())
             if "monitor" in m]
    assert [(m["step"], m["epoch"], m["monitor"]) for m in lines] == [(6, 0, "test"), (12, 1, "test")]
    assert all(m["mean_norm"] > 0 for m in lines)
    with pytest.raises(UserError, match="no monitor was handed"):
        pretrain(shards, cfg, tmp_path / "other", monitor_split="test", max_steps=1, **kw)


@pytest.mark.parametrize("flag, value, expected", [
    # numeric flags: the CLI's bounds (cli/_bounds.py) refuse them before RunOptions sees them
    ("--log-every", "0", "'--log-every': 0: expected an integer >= 1"),
    ("--checkpoint-every", "-1", "'--checkpoint-every': -1: expected an integer >= 1"),
    ("--max-steps", "0", "'--max-steps': 0: expected an integer >= 1"),
    ("--resume", "sometimes", "--resume sometimes: expected auto or never"),
    ("--workers", "-2", "'--workers': -2: expected an integer >= 0"),
])
def test_run_options_refuse_bad_values_with_exit_2(shards, tmp_path, capsys, flag, value, expected):
    code, stdout, stderr = _cli(capsys, "pretrain", str(shards), "--recipe", "moco_v2", "--out", str(tmp_path / "run"), flag, value)
    assert code == 2 and expected in stderr and "Traceback" not in stderr and stdout == ""
    assert not (tmp_path / "run").exists()


def test_run_options_are_checked_for_every_stage(tmp_path):
    from sslctl.errors import UserError
    from sslctl.finetune import finetune
    from sslctl.run_options import RunOptions

    with pytest.raises(UserError, match="--views batch-on-device: expected one of auto, per-image, batch") as err:
        RunOptions(views="batch-on-device")
    assert err.value.exit_code == 2
    with pytest.raises(UserError, match="--log-every 0"):
        finetune(tmp_path / "no-run", tmp_path / "no-shards", tmp_path / "ft", log_every=0)


def test_a_recipe_with_other_views_than_the_method_takes_is_refused(shards, tmp_path, capsys):
    code, _, stderr = _cli(capsys, "pretrain", str(shards), "--recipe", "simclr", "--out", str(tmp_path / "run"),
                           "--set", "augment.views=3", "--batch-size", "16", "--max-steps", "1", "--workers", "0")
    assert code == 2 and "makes 3 views per image; method 'simclr' takes 2" in stderr


def test_method_defaults_fill_a_recipe_that_omits_the_key(tmp_path):
    from sslctl.paths import RECIPES_DIR
    from sslctl.recipes import load_recipe

    text = (RECIPES_DIR / "simclr.toml").read_text()
    path = tmp_path / "older.toml"
    path.write_text("\n".join(line for line in text.splitlines() if not line.startswith(("fused_views", "sync_bn"))))
    cfg = load_recipe(path)
    assert cfg["method"]["fused_views"] is True and cfg["method"]["sync_bn"] is False  # SimCLR.defaults
    assert load_recipe(path, overrides=["method.fused_views=false"])["method"]["fused_views"] is False


def test_loss_similarity_selects_what_the_loss_scores(tmp_path):
    import torch.nn.functional as F

    from sslctl.errors import UserError
    from sslctl.methods import build_method

    m = build_method(_simclr_cfg())
    x = torch.randn(4, 8)
    assert torch.equal(m.similarity(x), F.normalize(x, dim=1))  # cosine: dot products of unit vectors
    with pytest.raises(UserError, match="loss.similarity = 'dot' is not supported by method 'simclr'"):
        build_method(_simclr_cfg("loss.similarity=dot"))
