"""`sslctl embed`: the features equal a direct forward pass, rows follow the shards, an
interrupted run resumes to identical output, and every kind of ENCODER works."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from sslctl.augment import eval_transform
from sslctl.data import iter_shard, load_manifest, split_shards
from sslctl.embed import embed, load_split, read_features_metadata
from sslctl.encoders import build_backbone
from tests.evalkit import CHEAP_ENCODER, make_shards
from tests.conftest import run_bounded


@pytest.fixture(autouse=True)
def _threads():
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """200 train + 100 test images in 6 shards of 50."""
    return make_shards(tmp_path_factory.mktemp("embed"))


def direct_forward(model, shards, split, size, mean, std):
    """The obvious way: every image of the split in stored order through the model, one by one."""
    transform = eval_transform(size, mean, std)
    feats, labels = [], []
    with torch.no_grad():
        for tar in split_shards(shards, split):
            for _, image, label in iter_shard(tar, rgb=True):
                feats.append(model(transform(image)[None])[0])
                labels.append(label)
    return torch.stack(feats), torch.tensor(labels)


def test_random_resnet18_equals_a_direct_forward_of_the_same_model(shards, tmp_path):
    out = embed("resnet18", shards, weights="random", input_size=32, bf16=False, workers=0, batch_size=64,
                seed=7, out=tmp_path / "f.safetensors")
    manifest = load_manifest(shards)
    mean, std = manifest["mean"] * 3, manifest["std"] * 3  # gray shards: the manifest holds one channel
    torch.manual_seed(7)
    model = build_backbone("resnet18").eval()
    for split in ("train", "test"):
        feats, labels = load_split(out, split)
        ref_feats, ref_labels = direct_forward(model, shards, split, 32, mean, std)
        assert feats.shape == (manifest["splits"][split]["count"], 512)
        assert torch.equal(labels, ref_labels)
        assert torch.allclose(feats, ref_feats, rtol=1e-4, atol=1e-5)
    meta = read_features_metadata(out)
    assert meta["splits"] == ["train", "test"] and meta["layer"] == "backbone" and not meta["bf16"]
    assert meta["encoder"] == {"arch": "resnet18", "small_stem": False, "weights": "random", "seed": 7}
    assert meta["normalization"]["source"] == "manifest"
    assert meta["normalization"]["mean"] == pytest.approx(mean)
    assert meta["classes"] == manifest["classes"] and len(meta["classes"]) == 10 and meta["input_size"] == 32
    assert meta["provenance"]["inputs"]["shards"]["path"] == manifest["path"]
    assert not (tmp_path / "f.safetensors.parts").exists()  # the per-shard parts are cleaned up


def test_bf16_and_workers_change_nothing_that_matters(shards, tmp_path):
    kwargs = dict(weights="random", input_size=32, splits=["test"], seed=1)
    fp32 = load_split(embed("resnet18", shards, bf16=False, workers=0, out=tmp_path / "a.safetensors", **kwargs), "test")
    # two decoding processes take whole shards each: rows still come back in stored order
    bf16 = load_split(embed("resnet18", shards, bf16=True, workers=2, batch_size=32, out=tmp_path / "b.safetensors", **kwargs), "test")
    assert torch.equal(fp32[1], bf16[1])
    cos = torch.nn.functional.cosine_similarity(fp32[0], bf16[0], dim=1)
    assert cos.min() > 0.99


def test_float16_storage(shards, tmp_path):
    out = embed("resnet18", shards, weights="random", input_size=32, splits=["test"], dtype="float16",
                bf16=False, workers=0, out=tmp_path / "h.safetensors")
    assert load_file(str(out))["test.features"].dtype == torch.float16


def _embed_cmd(shards, out, *extra):
    return [sys.executable, "-m", "sslctl", "embed", *CHEAP_ENCODER, str(shards), "--out", str(out), "--batch-size", "10", *extra]


def test_an_interrupted_embed_resumes_to_identical_output(shards, tmp_path):
    """Byte for byte: the features of an uninterrupted run, and of a run killed with parts
    written and resumed, in other processes, have one sha256."""
    from sslctl.artifacts import sha256_file

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = tmp_path / "f.safetensors"
    parts = tmp_path / "f.safetensors.parts"
    first = run_bounded(_embed_cmd(shards, out), env=env)
    assert first.returncode == 0, first.stderr
    uninterrupted = sha256_file(out)
    out.unlink()

    proc = subprocess.Popen(_embed_cmd(shards, out), stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    deadline = time.monotonic() + 120
    while len(list(parts.glob("*.safetensors"))) < 2 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)  # the hard way: no cleanup, no handler
    proc.communicate(timeout=120)  # its loader worker sees the parent gone within seconds
    done = len(list(parts.glob("*.safetensors")))
    assert 2 <= done < 6 and not out.exists(), "the embed finished before it could be interrupted"

    again = run_bounded(_embed_cmd(shards, out), env=env)
    assert again.returncode == 0, again.stderr
    assert f"resuming, {50 * done} of 300 images already embedded" in again.stderr
    assert again.stdout.strip() == str(out)
    assert sha256_file(out) == uninterrupted
    assert not parts.exists()


def test_parts_made_with_other_settings_are_redone(shards, tmp_path):
    from safetensors.torch import save_file

    out = tmp_path / "f.safetensors"
    parts = tmp_path / "f.safetensors.parts"
    parts.mkdir()
    # A part of the right shape from another encoder (fingerprint differs) must not be reused.
    save_file({"features": torch.zeros(50, 512), "labels": torch.zeros(50, dtype=torch.int64)},
              str(parts / "test-000000.safetensors"), metadata={"fingerprint": "another encoder"})
    embed("resnet18", shards, weights="random", input_size=32, splits=["test"], bf16=False, workers=0, out=out)
    assert load_split(out, "test")[0][:50].abs().sum() > 0


@pytest.fixture(scope="module")
def run_dir(shards, tmp_path_factory):
    """A real (two-step) MoCo v2 run: recipe.toml, checkpoints/last.pt, encoder.safetensors."""
    from sslctl.recipes import load_recipe
    from sslctl.train import pretrain

    cfg = load_recipe("moco_v2", variant="small", overrides=["augment.crop_size=16", "optim.batch_size=16",
                                                              "method.queue_size=64", "method.bn_splits=2"])
    return pretrain(shards, cfg, tmp_path_factory.mktemp("run") / "moco", max_steps=2, workers=0, seed=0)


def test_run_directory_encoder_file_and_projector_layer(run_dir, shards):
    from sslctl import checkpoint
    from sslctl.encoder_io import load_encoder
    from sslctl.methods import build_method
    from sslctl.recipes import load_recipe

    out = embed(run_dir, shards, splits=["test"], bf16=False, workers=0)
    assert out == run_dir / "features.safetensors"
    meta = read_features_metadata(out)
    assert meta["input_size"] == 16 and meta["normalization"]["source"] == "encoder"
    assert meta["provenance"]["inputs"]["encoder"]["path"] == str((run_dir / "encoder.safetensors").resolve())
    backbone, enc_meta = load_encoder(run_dir / "encoder.safetensors")
    ref, _ = direct_forward(backbone.eval(), shards, "test", 16, enc_meta["mean"], enc_meta["std"])
    assert torch.allclose(load_split(out, "test")[0], ref, rtol=1e-4, atol=1e-5)
    # the encoder file itself gives the same features
    same = embed(run_dir / "encoder.safetensors", shards, splits=["test"], bf16=False, workers=0, out=run_dir / "again.safetensors")
    assert torch.equal(load_split(same, "test")[0], load_split(out, "test")[0])

    proj = embed(run_dir, shards, splits=["test"], layer="projector", bf16=False, workers=0)
    assert proj == run_dir / "features-projector.safetensors"
    method = build_method(load_recipe(run_dir / "recipe.toml"))
    method.load_state_dict(checkpoint.load(checkpoint.checkpoint_path(run_dir))["model"])
    method.eval()

    class Projector(torch.nn.Module):
        def forward(self, x):
            return method.embed(x, "projector")

    ref, _ = direct_forward(Projector(), shards, "test", 16, enc_meta["mean"], enc_meta["std"])
    feats = load_split(proj, "test")[0]
    assert feats.shape[1] == 128 and torch.allclose(feats, ref, rtol=1e-4, atol=1e-5)

    # --weights random with a run: the same architecture and input, a seeded fresh initialisation
    floor = embed(run_dir, shards, splits=["test"], weights="random", bf16=False, workers=0)
    assert floor == run_dir / "features-random.safetensors"
    floor_meta = read_features_metadata(floor)
    assert floor_meta["encoder"]["weights"] == "random" and floor_meta["input_size"] == 16
    assert not torch.allclose(load_split(floor, "test")[0], load_split(out, "test")[0])


def test_embed_reads_the_run_directory_from_stdin(run_dir, shards, tmp_path, cli):
    res = cli("embed", "-", str(shards), "--split", "test", "--out", str(tmp_path / "p.safetensors"), "--no-bf16",
              "--workers", "0", stdin=f"{run_dir}\n", env={"OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stderr
    assert res.stdout == f"{tmp_path / 'p.safetensors'}\n"  # stdout carries the path and nothing else
    assert "images/s" in res.stderr
    assert read_features_metadata(tmp_path / "p.safetensors")["splits"] == ["test"]


def test_a_resume_with_every_part_written_assembles_the_file(shards, tmp_path, monkeypatch):
    """Interrupted after the last part but before FEATS was assembled: the rerun has no shard
    left to embed (no loader workers to start) and only assembles the parts."""
    import shutil

    reference = embed("resnet18", shards, weights="random", input_size=32, bf16=False, workers=0,
                      out=tmp_path / "reference.safetensors")
    out = tmp_path / "f.safetensors"
    with monkeypatch.context() as m:  # keep the parts, as a kill after the last one would
        m.setattr(shutil, "rmtree", lambda *args, **kwargs: None)
        embed("resnet18", shards, weights="random", input_size=32, bf16=False, workers=1, out=out)
    out.unlink()
    assert len(list((tmp_path / "f.safetensors.parts").glob("*.safetensors"))) == 6
    embed("resnet18", shards, weights="random", input_size=32, bf16=False, workers=1, out=out)
    a, b = load_file(str(reference)), load_file(str(out))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not (tmp_path / "f.safetensors.parts").exists()


@pytest.mark.parametrize("field", ["split", "shard"])
def test_a_manifest_name_that_leaves_its_folder_is_refused(shards, tmp_path, field):
    """Names read from an artifact become parts of the paths embed writes (FEATS.parts/SPLIT-N):
    a split named ../../../X wrote three folders up. Refused, exit 2, naming the manifest."""
    import json
    import shutil

    from tests.conftest import run_cli

    bad = tmp_path / "deep" / "er" / "shards"
    shutil.copytree(shards, bad)
    manifest = json.loads((bad / "manifest.json").read_text())
    if field == "split":
        manifest["splits"]["../../../X"] = manifest["splits"].pop("test")
    else:
        manifest["splits"]["test"]["shards"][0]["name"] = "../outside.tar"
    (bad / "manifest.json").write_text(json.dumps(manifest))
    done = run_cli("embed", *CHEAP_ENCODER, str(bad), "--out", str(bad / "f.safetensors"), "--workers", "0")
    assert done.returncode == 2, done.stderr
    assert str(bad / "manifest.json") in done.stderr and "Traceback" not in done.stderr
    assert ("is not a split name" if field == "split" else "is not a file name") in done.stderr
    assert not list(tmp_path.rglob("X-*")) and not (bad / "f.safetensors").exists()
