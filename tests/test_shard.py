"""`sslctl shard`: every source round-trips exactly, bad inputs are skipped and reported,
output is deterministic and resumable, user mistakes exit 2 without overwriting anything."""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import pickle
import signal
import subprocess
import sys
import tarfile
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from sslctl.data import iter_shard, load_manifest, split_shards
from sslctl.errors import UserError
from sslctl.shard import Options, parse_size, shard
from sslctl.sources import FASHION_MNIST_CLASSES, read_idx
from tests.conftest import run_cli


def _idx_arrays(root: Path, prefix: str) -> tuple[np.ndarray, np.ndarray]:
    return read_idx(root / f"{prefix}-images-idx3-ubyte.gz"), read_idx(root / f"{prefix}-labels-idx1-ubyte.gz")


def _stored(tar_path: Path) -> dict[str, dict[str, bytes]]:
    """{key: {ext: bytes}} straight from the tar, without sslctl's reader."""
    out: dict[str, dict[str, bytes]] = {}
    with tarfile.open(tar_path) as tar:
        for m in tar:
            key, ext = m.name.split(".", 1)
            out.setdefault(key, {})[ext] = tar.extractfile(m).read()
    return out


def _all_stored(out: Path, split: str) -> dict[str, dict[str, bytes]]:
    samples: dict[str, dict[str, bytes]] = {}
    for tar in split_shards(out, split):
        samples.update(_stored(tar))
    return samples


def _check_idx_roundtrip(src: Path, out: Path, counts: dict[str, int]) -> None:
    manifest = load_manifest(out)
    assert {s: manifest["splits"][s]["count"] for s in counts} == counts
    assert manifest["classes"] == FASHION_MNIST_CLASSES and manifest["labelled"] is True
    assert manifest["channels"] == 1 and manifest["image_size"] == [28, 28] and manifest["skipped"] == []
    for split, prefix in (("train", "train"), ("test", "t10k")):
        images, labels = _idx_arrays(src, prefix)
        seen = np.zeros(len(images), bool)
        for tar in split_shards(manifest, split):
            for key, image, label in iter_shard(tar):
                row = int(key)
                assert not seen[row], f"{key} stored twice"
                seen[row] = True
                assert image.dtype == torch.uint8 and image.shape == (1, 28, 28)  # grayscale stays grayscale
                assert np.array_equal(image[0].numpy(), images[row]), f"pixels differ at {split} row {row}"
                assert label == labels[row]
        assert seen.all()
        if split == "train":  # mean/std of the training split, from the source pixels
            x = images.astype(np.float64) / 255
            assert manifest["mean"][0] == pytest.approx(x.mean(), abs=2e-6)
            assert manifest["std"][0] == pytest.approx(x.std(), abs=2e-6)
    for split in counts:
        for entry, tar in zip(manifest["splits"][split]["shards"], split_shards(manifest, split)):
            data = tar.read_bytes()
            assert len(data) == entry["bytes"] and hashlib.sha256(data).hexdigest() == entry["sha256"]


@pytest.fixture(scope="module")
def mini_shards(tmp_path_factory, mini_idx) -> Path:
    out = tmp_path_factory.mktemp("mini") / "shards"
    shard(mini_idx, out, options=Options(max_count=1500), workers=2)
    return out


def test_idx_roundtrip_embedded(mini_idx, mini_shards):
    _check_idx_roundtrip(mini_idx, mini_shards, {"train": 5000, "test": 1000})
    names = [e["name"] for e in load_manifest(mini_shards)["splits"]["train"]["shards"]]
    assert names == ["train-000000.tar", "train-000001.tar", "train-000002.tar", "train-000003.tar"]
    # PNG stored in mode L, with the class index as ASCII
    sample = next(iter(_stored(mini_shards / names[0]).values()))
    assert Image.open(io.BytesIO(sample["png"])).mode == "L" and sample["cls"].decode().isdigit()


@pytest.mark.slow
def test_idx_roundtrip_full_fashion_mnist(fmnist_idx, tmp_path):
    result = run_cli("shard", str(fmnist_idx), str(tmp_path / "out"), "--quiet")
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"{tmp_path / 'out' / 'manifest.json'}\n"
    _check_idx_roundtrip(fmnist_idx, tmp_path / "out", {"train": 60000, "test": 10000})


# ---------------------------------------------------------------- image folders with bad files

def _write_image_folder(root: Path, mini_idx: Path, per_class: int = 6) -> dict[str, tuple[Path, int]]:
    """train/ and test/ class folders of real JPEG and PNG files (half each). {relpath: (file, label)}."""
    images, labels = _idx_arrays(mini_idx, "train")
    written, counts = {}, Counter()
    for i, (img, label) in enumerate(zip(images, labels)):
        if counts[label] >= 2 * per_class:
            continue
        split = "train" if counts[label] < per_class else "test"
        counts[label] += 1
        ext = "jpg" if i % 2 else "png"
        rel = f"{split}/class_{label}/img{i}.{ext}"
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        pil = Image.fromarray(img)
        if i % 3 == 0:
            pil = pil.convert("RGB")  # some colour files among the gray ones
        pil.save(path, quality=90) if ext == "jpg" else pil.save(path)
        written[rel] = (path, int(label))
    return written


def _add_bad_files(root: Path) -> dict[str, str]:
    good_jpg = next(root.rglob("*.jpg"))
    bad = {
        "train/class_0/truncated.jpg": good_jpg.read_bytes()[: len(good_jpg.read_bytes()) // 2],
        "train/class_1/empty.png": b"",
        "test/class_2/notes.jpg": b"this is a text file, not a JPEG\n",
    }
    for rel, data in bad.items():
        (root / rel).write_bytes(data)
    (root / "train" / "class_3" / "README.txt").write_text("not an image, ignored by extension\n")
    return {"train/class_0/truncated.jpg": "truncated", "train/class_1/empty.png": "empty", "test/class_2/notes.jpg": "not an image"}


def test_image_folder_skips_bad_files_and_roundtrips_the_rest(tmp_path, mini_idx):
    src = tmp_path / "folder"
    written = _write_image_folder(src, mini_idx)
    bad = _add_bad_files(src)
    out = tmp_path / "out"
    result = run_cli("shard", str(src), str(out), "--workers", "2")
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"{out / 'manifest.json'}\n"  # stdout: the manifest path only
    for rel in bad:
        assert rel.split("/")[-1] in result.stderr  # warned
    manifest = load_manifest(out)
    assert manifest["source"]["kind"] == "folder"
    assert manifest["classes"] == [f"class_{i}" for i in range(10)]
    skipped = {Path(s["path"]).relative_to(src).as_posix(): s["reason"] for s in manifest["skipped"]}
    assert set(skipped) == set(bad)
    for rel, word in bad.items():
        assert word in skipped[rel]
    assert manifest["splits"]["train"]["skipped"] == 2 and manifest["splits"]["test"]["skipped"] == 1
    assert manifest["channels"] == 3  # some files are colour

    by_hash = {}
    for split in ("train", "test"):
        for sample in _all_stored(out, split).values():
            ext = next(e for e in ("jpg", "png", "webp") if e in sample)
            by_hash[hashlib.sha256(sample[ext]).hexdigest()] = (split, ext, int(sample["cls"]))
    assert len(by_hash) == len(written)
    for rel, (path, label) in written.items():
        data = path.read_bytes()
        split, ext, stored_label = by_hash[hashlib.sha256(data).hexdigest()]  # original bytes, unchanged
        assert (split, ext, stored_label) == (rel.split("/")[0], path.suffix[1:], label)

    # the reader decodes them to the same pixels as PIL does from the original file
    originals = {hashlib.sha256(p.read_bytes()).hexdigest(): p for p, _ in written.values()}
    for tar in split_shards(manifest, "train"):
        stored = _stored(tar)
        for key, image, label in iter_shard(tar):
            ext = next(e for e in ("jpg", "png") if e in stored[key])
            original = Image.open(originals[hashlib.sha256(stored[key][ext]).hexdigest()])
            expected = np.asarray(original)
            assert np.array_equal(image.permute(1, 2, 0).numpy().squeeze(-1) if image.shape[0] == 1
                                  else image.permute(1, 2, 0).numpy(), expected)


def _jpeg_without_scan(jpg: bytes) -> bytes:
    """A JPEG whose header parses and which ends with EOI, but holds no image data."""
    return jpg[: jpg.index(b"\xff\xda")] + b"\xff\xd9"


def _jpeg_claiming(jpg: bytes, height: int, width: int) -> bytes:
    """The same JPEG with its SOF header claiming another size (a decompression bomb's trick)."""
    data = bytearray(jpg)
    sof = data.index(b"\xff\xc0")
    data[sof + 5 : sof + 9] = height.to_bytes(2, "big") + width.to_bytes(2, "big")
    return bytes(data)


def test_pass_through_files_not_decoded_are_still_verified(tmp_path, mini_idx, monkeypatch):
    """Beyond the stats sample, every file kept as is is still decoded (a JPEG at 1/8 scale):
    a header with no image data, a truncated PNG and a claimed 60000 x 60000 are skipped."""
    import sslctl.shard as shard_module

    monkeypatch.setattr(shard_module, "STATS_SAMPLE", 0)  # no file decoded for statistics
    src = tmp_path / "src"
    written = _write_image_folder(src, mini_idx, per_class=2)
    bad = _add_bad_files(src)
    png = next(src.rglob("*.png")).read_bytes()
    (src / "train" / "class_4" / "cut.png").write_bytes(png[:-30])  # no IEND: truncated
    jpg = next(src.rglob("*.jpg"))
    (src / "train" / "class_5" / "trailer.jpg").write_bytes(jpg.read_bytes() + b"camera trailer")  # valid
    (src / "train" / "class_6" / "noscan.jpg").write_bytes(_jpeg_without_scan(jpg.read_bytes()))
    (src / "test" / "class_7" / "bomb.jpg").write_bytes(_jpeg_claiming(jpg.read_bytes(), 60000, 60000))
    manifest = load_manifest(shard(src, tmp_path / "out", workers=1))
    skipped = {Path(s["path"]).name: s["reason"] for s in manifest["skipped"]}
    assert set(skipped) == {Path(rel).name for rel in bad} | {"cut.png", "noscan.jpg", "bomb.jpg"}
    assert "60000 x 60000 = 3,600,000,000 pixels, over the limit of 100,000,000" in skipped["bomb.jpg"]
    assert "--max-pixels" in skipped["bomb.jpg"]
    assert manifest["stats_images"] == 1  # only trailer.jpg (not stored as is: trailing bytes) got a full decode
    stored = {hashlib.sha256(v[e]).hexdigest() for split in ("train", "test")
              for v in _all_stored(tmp_path / "out", split).values() for e in ("jpg", "png") if e in v}
    expected = {hashlib.sha256(p.read_bytes()).hexdigest() for p, _ in written.values()}
    expected.add(hashlib.sha256((src / "train" / "class_5" / "trailer.jpg").read_bytes()).hexdigest())
    assert stored == expected
    assert manifest["channels"] == 3  # from the headers


def test_max_pixels_skips_large_images_and_names_the_flag(tmp_path, mini_idx):
    src = tmp_path / "src"
    _write_image_folder(src, mini_idx, per_class=1)
    Image.new("RGB", (300, 200), (10, 20, 30)).save(src / "train" / "class_0" / "large.png")
    done = run_cli("shard", str(src), str(tmp_path / "out"), "--max-pixels", "50000")
    assert done.returncode == 0, done.stderr
    reasons = {Path(s["path"]).name: s["reason"] for s in load_manifest(tmp_path / "out")["skipped"]}
    assert reasons == {"large.png": "300 x 200 = 60,000 pixels, over the limit of 50,000 (a decompression-bomb "
                                    "guard; raise --max-pixels to keep it)"}
    assert run_cli("shard", str(src), str(tmp_path / "all")).returncode == 0
    assert load_manifest(tmp_path / "all")["skipped"] == []


def test_each_image_weighs_the_same_in_the_mean_and_std(tmp_path):
    """One 1200 x 1200 white image among forty 32 x 32 black ones: per pixel it would set the
    mean to 0.99; per image it is 1/41."""
    src = tmp_path / "src" / "train"
    (src / "a").mkdir(parents=True)
    for i in range(40):
        Image.new("L", (32, 32), 0).save(src / "a" / f"{i}.png")
    Image.new("L", (1200, 1200), 255).save(src / "a" / "large.png")
    manifest = load_manifest(shard(tmp_path / "src", tmp_path / "out", workers=1))
    assert manifest["mean"] == pytest.approx([1 / 41], abs=1e-6)
    assert manifest["std"] == pytest.approx([math.sqrt(1 / 41 - 1 / 41**2)], abs=1e-6)


def test_mean_std_of_files_come_from_the_first_images_in_shard_order(tmp_path, mini_idx, monkeypatch):
    import sslctl.shard as shard_module

    monkeypatch.setattr(shard_module, "STATS_SAMPLE", 7)
    src = tmp_path / "src"
    _write_image_folder(src, mini_idx, per_class=3)
    manifest = load_manifest(shard(src, tmp_path / "out", workers=2))
    assert manifest["stats_images"] == 7 and manifest["channels"] == 3
    first = [image for tar in split_shards(manifest, "train") for _, image, _ in iter_shard(tar, rgb=True)][:7]
    pixels = torch.cat([x.reshape(3, -1) for x in first], 1).double() / 255
    assert manifest["mean"] == pytest.approx(pixels.mean(1).tolist(), abs=2e-6)
    assert manifest["std"] == pytest.approx(pixels.std(1, unbiased=False).tolist(), abs=2e-6)


def test_unlabelled_nested_folder(tmp_path, mini_idx):
    images, _ = _idx_arrays(mini_idx, "t10k")
    for i in range(30):
        d = tmp_path / "src" / f"a{i % 3}" / f"b{i % 2}" / ("c" if i % 5 else "")
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(images[i]).save(d / f"{i}.png")
    out = shard(tmp_path / "src", tmp_path / "out", workers=1)
    manifest = load_manifest(out)
    assert manifest["source"]["kind"] == "images" and manifest["labelled"] is False and manifest["classes"] is None
    assert manifest["splits"]["train"]["count"] == 30
    for sample in _all_stored(tmp_path / "out", "train").values():
        assert set(sample) == {"png"}  # no .cls when unlabelled
    labels = [label for tar in split_shards(manifest, "train") for _, _, label in iter_shard(tar)]
    assert labels == [-1] * 30


# ---------------------------------------------------------------- CIFAR pickles and CSV lists

def _cifar_like(images: np.ndarray) -> np.ndarray:
    """N x 3072 CIFAR rows (R plane, G plane, B plane) with three different channels."""
    rgb = np.stack([images, 255 - images, images // 2], axis=1)  # N x 3 x 28 x 28
    rgb = np.pad(rgb, ((0, 0), (0, 0), (2, 2), (2, 2)))  # 32 x 32 like CIFAR
    return rgb.reshape(len(images), 3072).astype(np.uint8)


def test_cifar_pickles_roundtrip(tmp_path, mini_idx):
    images, labels = _idx_arrays(mini_idx, "train")
    src = tmp_path / "cifar-10-batches-py"
    src.mkdir()
    batches = {"data_batch_1": slice(0, 40), "data_batch_2": slice(40, 70), "test_batch": slice(70, 90)}
    for name, rows in batches.items():
        with open(src / name, "wb") as f:  # bytes keys, as the real Python-2 pickles load with encoding="bytes"
            pickle.dump({b"data": _cifar_like(images[rows]), b"labels": labels[rows].tolist(),
                         b"batch_label": name.encode()}, f, protocol=2)
    with open(src / "batches.meta", "wb") as f:
        pickle.dump({b"label_names": [c.encode() for c in FASHION_MNIST_CLASSES]}, f, protocol=2)
    result = run_cli("shard", str(src), str(tmp_path / "out"), "--max-count", "25", "--quiet")
    assert result.returncode == 0, result.stderr
    manifest = load_manifest(tmp_path / "out")
    assert manifest["source"]["kind"] == "cifar" and manifest["classes"] == FASHION_MNIST_CLASSES
    assert manifest["channels"] == 3 and manifest["image_size"] == [32, 32]
    assert manifest["splits"]["train"]["count"] == 70 and manifest["splits"]["test"]["count"] == 20
    assert len(manifest["splits"]["train"]["shards"]) == 3
    for split in ("train", "test"):
        for tar in split_shards(manifest, split):
            for key, image, label in iter_shard(tar):
                batch, row = key.rsplit("_", 1)
                i = batches[batch].start + int(row)
                expected = _cifar_like(images[i : i + 1]).reshape(3, 32, 32)
                assert np.array_equal(image.numpy(), expected) and label == labels[i]
    train_pixels = _cifar_like(images[:70]).reshape(70, 3, 1024).transpose(1, 0, 2).reshape(3, -1) / 255
    assert manifest["mean"] == pytest.approx(train_pixels.mean(1).tolist(), abs=2e-6)
    assert manifest["std"] == pytest.approx(train_pixels.std(1).tolist(), abs=2e-6)


def test_cifar_pickle_that_runs_code_is_refused(tmp_path):
    src = tmp_path / "cifar"
    src.mkdir()
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    (src / "data_batch_1").write_bytes(pickle.dumps({b"data": Evil(), b"labels": [0]}))
    result = run_cli("shard", str(src), str(tmp_path / "out"))
    assert result.returncode == 2 and "not a CIFAR python pickle" in result.stderr
    assert not marker.exists() and "Traceback" not in result.stderr


def test_csv_and_tsv_lists(tmp_path, mini_idx):
    images, labels = _idx_arrays(mini_idx, "t10k")
    (tmp_path / "img").mkdir()
    rows = []
    for i in range(40):
        Image.fromarray(images[i]).save(tmp_path / "img" / f"{i}.png")
        rows.append((f"img/{i}.png", FASHION_MNIST_CLASSES[labels[i]].replace("/", "-")))
    rows.append(("img/missing.png", "Bag"))
    (tmp_path / "list.csv").write_text("path,label\n" + "".join(f"{p},{c}\n" for p, c in rows))
    out = shard(tmp_path / "list.csv", tmp_path / "out", options=Options(val_fraction=0.25), workers=2)
    manifest = load_manifest(out)
    assert manifest["source"]["kind"] == "csv"
    assert manifest["classes"] == sorted({c for _, c in rows})
    assert [s["path"] for s in manifest["skipped"]] == [str(tmp_path / "img" / "missing.png")]
    assert "unreadable" in manifest["skipped"][0]["reason"]
    assert manifest["splits"]["train"]["count"] + manifest["splits"]["val"]["count"] == 40
    for split in ("train", "val"):
        for tar in split_shards(manifest, split):
            for key, image, label in iter_shard(tar):
                i = int(key.split("_")[-1])  # key from "img/7.png" -> "img_7"
                assert np.array_equal(image[0].numpy(), images[i])
                assert manifest["classes"][label] == rows[i][1]

    (tmp_path / "list.tsv").write_text("".join(f"{p}\n" for p, _ in rows[:10]))
    manifest = load_manifest(shard(tmp_path / "list.tsv", tmp_path / "out_tsv", workers=1))
    assert manifest["labelled"] is False and manifest["splits"]["train"]["count"] == 10


# ---------------------------------------------------------------- options

def test_val_fraction_is_stratified_and_disjoint(tmp_path, mini_idx):
    out = shard(mini_idx, tmp_path / "out", options=Options(val_fraction=0.1, seed=3), workers=2)
    manifest = load_manifest(out)
    assert manifest["splits"]["val"]["count"] == 500 and manifest["splits"]["train"]["count"] == 4500
    per_class = Counter(int(s["cls"]) for s in _all_stored(tmp_path / "out", "val").values())
    assert per_class == {c: 50 for c in range(10)}  # the embedded set has 500 per class
    val_keys = set(_all_stored(tmp_path / "out", "val"))
    assert not val_keys & set(_all_stored(tmp_path / "out", "train"))


def test_max_size_and_max_count(tmp_path, mini_idx):
    out = shard(mini_idx, tmp_path / "out", options=Options(max_size=parse_size("200KB"), max_count=120), workers=2)
    manifest = load_manifest(out)
    for split in ("train", "test"):
        entries = manifest["splits"][split]["shards"]
        assert all(e["bytes"] <= 200 * 1024 and e["count"] <= 120 for e in entries)
        assert sum(e["count"] for e in entries) == manifest["splits"][split]["count"]
        assert any(e["count"] < 120 for e in entries[:-1])  # the size limit did bind


def test_max_side_and_format_reencode(tmp_path, mini_idx):
    images, _ = _idx_arrays(mini_idx, "t10k")
    src = tmp_path / "src"
    for i in range(12):
        (src / f"c{i % 2}").mkdir(parents=True, exist_ok=True)
        big = Image.fromarray(images[i]).resize((56, 42))
        (big.convert("RGB") if i % 2 else big).save(src / f"c{i % 2}" / f"{i}.jpg", quality=95)
    out = shard(src, tmp_path / "webp", options=Options(max_side=20, format="webp"), workers=2)
    for sample in _all_stored(tmp_path / "webp", "train").values():
        img = Image.open(io.BytesIO(sample["webp"]))
        assert img.size == (20, 15)
    assert load_manifest(out)["image_size"] == [15, 20]
    # --format png of a JPEG: the decoded JPEG pixels, losslessly
    shard(src, tmp_path / "png", options=Options(format="png"), workers=1)
    pngs = {hashlib.sha256(np.asarray(Image.open(io.BytesIO(s["png"]))).tobytes()).hexdigest()
            for s in _all_stored(tmp_path / "png", "train").values()}
    for f in src.rglob("*.jpg"):
        assert hashlib.sha256(np.asarray(Image.open(f)).tobytes()).hexdigest() in pngs
    gray = [Image.open(io.BytesIO(s["png"])).mode for s in _all_stored(tmp_path / "png", "train").values()]
    assert sorted(gray) == ["L"] * 6 + ["RGB"] * 6  # grayscale stays grayscale


# ---------------------------------------------------------------- determinism and resume

def _tar_bytes(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.glob("*.tar"))}


def test_deterministic_bytes_for_same_input_and_flags(tmp_path, mini_idx, mini_shards):
    shard(mini_idx, tmp_path / "again", options=Options(max_count=1500), workers=1)  # other worker count
    assert _tar_bytes(tmp_path / "again") == _tar_bytes(mini_shards)
    a, b = load_manifest(mini_shards), load_manifest(tmp_path / "again")
    for key in ("splits", "mean", "std", "classes", "fingerprint", "image_size"):
        assert a[key] == b[key]
    shard(mini_idx, tmp_path / "seed1", options=Options(max_count=1500, seed=1), workers=2)
    assert _tar_bytes(tmp_path / "seed1") != _tar_bytes(mini_shards)  # the seed sets the order
    with tarfile.open(mini_shards / "train-000000.tar") as tar:
        m = tar.getmembers()[0]
        assert (m.mtime, m.uid, m.gid, m.uname, m.mode) == (0, 0, 0, "", 0o444)


def test_resume_after_kill_keeps_finished_shards(tmp_path, mini_idx):
    out = tmp_path / "out"
    args = [sys.executable, "-m", "sslctl", "shard", str(mini_idx), str(out), "--max-count", "100", "--workers", "1"]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while not (out / "train-000003.tar").exists():
        assert proc.poll() is None and time.time() < deadline, "shard finished or stalled before it could be killed"
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL
    assert not (out / "manifest.json").exists()
    state = json.loads((out / ".sslctl-shard-state.json").read_text())
    finished = [s["name"] for s in state["splits"]["train"]["shards"]]
    assert len(finished) >= 3
    before = {n: (out / n).stat().st_mtime_ns for n in finished}

    result = run_cli("shard", str(mini_idx), str(out), "--max-count", "100", "--workers", "2")
    assert result.returncode == 0, result.stderr
    assert "resuming" in result.stderr
    assert {n: (out / n).stat().st_mtime_ns for n in finished} == before  # kept, not rewritten
    assert not list(out.glob(".*.tmp"))

    reference = tmp_path / "reference"
    shard(mini_idx, reference, options=Options(max_count=100), workers=2)
    assert _tar_bytes(out) == _tar_bytes(reference)
    assert load_manifest(out)["splits"] == load_manifest(reference)["splits"]

    # a damaged finished shard is detected by its hash and redone; the rest are kept
    victim = out / finished[1]
    victim.write_bytes(victim.read_bytes()[:-10240])
    result = run_cli("shard", str(mini_idx), str(out), "--max-count", "100")
    assert result.returncode == 0 and finished[1] in "".join(result.stderr.split())  # rich wraps lines
    assert _tar_bytes(out) == _tar_bytes(reference)
    assert (out / finished[0]).stat().st_mtime_ns == before[finished[0]]


def test_rerun_of_a_finished_run_changes_nothing(tmp_path, mini_idx):
    out = tmp_path / "out"
    assert run_cli("shard", str(mini_idx), str(out)).returncode == 0
    stamp = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    result = run_cli("shard", str(mini_idx), str(out))
    assert result.returncode == 0 and result.stdout == f"{out / 'manifest.json'}\n"
    assert "already complete" in result.stderr
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir() if not p.name.startswith(".")} == {
        k: v for k, v in stamp.items() if not k.startswith(".")
    }


# ---------------------------------------------------------------- user errors: exit 2, nothing overwritten

def _snapshot(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in d.iterdir()}


def test_bad_inputs_exit_2_with_a_message(tmp_path, mini_idx, mini_shards):
    def fails(*args, message):
        result = run_cli("shard", *map(str, args))
        assert result.returncode == 2, (args, result.stderr)
        assert message in result.stderr and "Traceback" not in result.stderr
        assert result.stdout == ""

    fails(tmp_path / "missing", tmp_path / "o1", message="no such file or directory")
    (tmp_path / "empty").mkdir()
    fails(tmp_path / "empty", tmp_path / "o2", message="empty source")
    (tmp_path / "only_text").mkdir()
    (tmp_path / "only_text" / "a.txt").write_text("x")
    fails(tmp_path / "only_text", tmp_path / "o3", message="empty source")

    before = _snapshot(mini_shards)
    fails(mini_idx, mini_shards, "--max-count", "1500", "--seed", "7", message="different dataset")
    fails(mini_idx, mini_shards, "--max-count", "999", message="different dataset")
    assert _snapshot(mini_shards) == before  # nothing overwritten

    other = tmp_path / "other"
    other.mkdir()
    (other / "precious.txt").write_text("keep me")
    fails(mini_idx, other, message="not an sslctl shards directory")
    assert (other / "precious.txt").read_text() == "keep me"

    fails(mini_idx, tmp_path / "o4", "--format", "gif", message="--format")
    fails(mini_idx, tmp_path / "o5", "--max-size", "lots", message="--max-size")
    fails(mini_idx, tmp_path / "o6", "--val-fraction", "1.5", message="--val-fraction")
    fails(mini_idx, tmp_path / "o7", "--source", "parquet", message="unknown source")

    bad_idx = tmp_path / "bad_idx"
    bad_idx.mkdir()
    (bad_idx / "train-images-idx3-ubyte").write_bytes((mini_idx / "train-images-idx3-ubyte.gz").read_bytes()[:100])
    fails(bad_idx, tmp_path / "o8", message="idx")

    split_folder = tmp_path / "splits"
    for split in ("train", "val"):
        (split_folder / split / "a").mkdir(parents=True)
        (split_folder / split / "b").mkdir(parents=True)
        Image.new("L", (4, 4)).save(split_folder / split / "a" / "x.png")
        Image.new("L", (4, 4)).save(split_folder / split / "b" / "y.png")
    fails(split_folder, tmp_path / "o9", "--val-fraction", "0.5", message="already has a val split")


def test_all_inputs_bad_is_an_error(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.jpg").write_bytes(b"")
    (src / "b.png").write_text("nope")
    with pytest.raises(UserError, match="no readable images"):
        shard(src, tmp_path / "out", workers=1)


def test_parse_size():
    assert parse_size("512MB") == 512 * 2**20 and parse_size("1G") == 2**30
    assert parse_size("300k") == 300 * 1024 and parse_size(4096) == 4096
