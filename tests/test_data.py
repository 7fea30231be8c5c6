"""sslctl.data: manifests, stored order, exactly-once epochs across ranks x workers, equal
lengths on every rank, deterministic (seed, epoch) order, mid-epoch resume, image options."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from sslctl.data import ShardDataset, iter_shard, load_manifest, make_loader, split_shards
from sslctl.errors import UserError
from sslctl.shard import Options, shard
from sslctl.sources import read_idx


@pytest.fixture(scope="module")
def shards(tmp_path_factory, mini_idx) -> Path:
    """Embedded Fashion-MNIST: train 5000 in 8 uneven shards (7 x 700 + 100), test 1000 in one."""
    out = tmp_path_factory.mktemp("data") / "shards"
    shard(mini_idx, out, options=Options(max_count=700), workers=2)
    return out


@pytest.fixture(scope="module")
def unlabelled(tmp_path_factory, mini_idx) -> Path:
    root = tmp_path_factory.mktemp("unlabelled")
    images = read_idx(mini_idx / "t10k-images-idx3-ubyte.gz")
    (root / "src").mkdir()
    for i in range(20):
        Image.fromarray(images[i]).save(root / "src" / f"{i}.png")
    return shard(root / "src", root / "shards", workers=1).parent


def _keys(dataset: ShardDataset, workers: int) -> list[str]:
    loader = DataLoader(dataset, batch_size=50, num_workers=workers)  # batches: less IPC, same keys
    return [key for _, _, keys in loader for key in keys]


def test_load_manifest_accepts_dir_or_file_and_rejects_others(shards, tmp_path):
    by_dir, by_file = load_manifest(shards), load_manifest(shards / "manifest.json")
    assert by_dir == by_file and by_dir["path"] == str((shards / "manifest.json").resolve())
    with pytest.raises(UserError, match=str(tmp_path / "manifest.json")):
        load_manifest(tmp_path)
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(UserError, match="not valid JSON"):
        load_manifest(tmp_path / "bad.json")
    (tmp_path / "other.json").write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(UserError, match="not an sslctl shards manifest"):
        load_manifest(tmp_path / "other.json")


def test_split_shards_and_iter_shard_follow_stored_order(shards):
    manifest = load_manifest(shards)
    paths = split_shards(shards, "train")
    assert [p.name for p in paths] == [s["name"] for s in manifest["splits"]["train"]["shards"]]
    assert [s["count"] for s in manifest["splits"]["train"]["shards"]] == [700] * 7 + [100]
    with pytest.raises(UserError, match="no split 'val'"):
        split_shards(manifest, "val")
    import tarfile

    with tarfile.open(paths[0]) as tar:
        stored = list(dict.fromkeys(m.name.split(".")[0] for m in tar))
    assert [key for key, _, _ in iter_shard(paths[0])] == stored
    # one rank, one worker, no shuffle: exactly the manifest's order
    dataset = ShardDataset(shards, "train", return_key=True, rank=0, world_size=1)
    assert [k for _, _, k in dataset] == [k for p in paths for k, _, _ in iter_shard(p)]


@pytest.mark.parametrize("split, buffer", [("train", 0), ("train", 300), ("test", 100)])
def test_each_sample_exactly_once_across_2_ranks_x_2_workers(shards, split, buffer):
    """8 uneven shards (train) and a single shard (test: fewer shards than ranks x workers)."""
    total = load_manifest(shards)["splits"][split]["count"]
    seen: Counter = Counter()
    lengths = []
    for rank in range(2):
        dataset = ShardDataset(shards, split, shuffle_buffer=buffer, seed=5, rank=rank, world_size=2, return_key=True)
        dataset.set_epoch(3)
        keys = _keys(dataset, workers=2)
        assert len(keys) == len(dataset)  # __len__ is what this rank yields
        lengths.append(len(dataset))
        seen.update(keys)
    assert len(seen) == total and set(seen.values()) == {1}
    assert lengths == [total // 2, total - total // 2]


def test_order_is_a_function_of_seed_and_epoch(shards):
    def order(seed, epoch, workers=2):
        dataset = ShardDataset(shards, "train", shuffle_buffer=500, seed=seed, rank=1, world_size=2, return_key=True)
        dataset.set_epoch(epoch)
        return _keys(dataset, workers)

    first = order(0, 0)
    assert order(0, 0) == first  # reproducible
    assert order(0, 1) != first and sorted(order(0, 1)) != sorted(first)  # shards move between ranks
    assert order(1, 0) != first
    # every epoch is still a partition: rank 0 + rank 1 = everything, once
    for epoch in (0, 1):
        other = ShardDataset(shards, "train", shuffle_buffer=500, seed=0, rank=0, world_size=2, return_key=True)
        other.set_epoch(epoch)
        both = Counter(order(0, epoch)) + Counter(_keys(other, 2))
        assert len(both) == 5000 and set(both.values()) == {1}


def test_loader_len_is_equal_on_every_rank_and_batches_are_disjoint(shards):
    batch, seen = 96, Counter()
    for rank in range(2):
        loader = make_loader(shards, "train", batch_size=batch, workers=2, rank=rank, world_size=2, seed=1, rgb=False)
        loader.dataset.return_key = True
        loader.set_epoch(0)
        batches = list(loader)
        assert len(loader) == 5000 // (batch * 2) == len(batches) == 26
        for images, labels, keys in batches:
            assert images.shape == (batch, 1, 28, 28) and images.dtype == torch.uint8 and labels.shape == (batch,)
            seen.update(keys)
    assert len(seen) == 26 * batch * 2 and set(seen.values()) == {1}
    # drop_last=False: every sample, the last batch partial
    loader = make_loader(shards, "test", batch_size=300, workers=2, shuffle=False, drop_last=False, rank=0, world_size=1)
    sizes = [len(labels) for _, labels in loader]
    assert len(loader) == 4 and sorted(sizes) == [100, 300, 300, 300]


def test_drop_last_leaves_out_different_samples_each_epoch_even_from_one_shard(shards):
    """The test split is ONE shard of 1000: batches of 96 on 2 ranks use 960 per epoch. The 40
    left out must change with the epoch (a fixed tail would never be trained on), and within an
    epoch the ranks stay disjoint."""
    used_per_epoch = []
    for epoch in range(3):
        seen = Counter()
        for rank in range(2):
            loader = make_loader(shards, "test", batch_size=96, workers=1, rank=rank, world_size=2, seed=5, rgb=False)
            loader.dataset.return_key = True
            loader.set_epoch(epoch)
            seen.update(key for _, _, keys in loader for key in keys)
        assert len(seen) == 960 and set(seen.values()) == {1}
        used_per_epoch.append(set(seen))
    assert len(set.union(*used_per_epoch)) > 960


def test_set_epoch_reaches_persistent_workers_and_start_batch_resumes_exactly(shards):
    loader = make_loader(shards, "train", batch_size=64, workers=2, seed=2, rank=0, world_size=1, shuffle_buffer=200)
    epochs = []
    for epoch in (0, 1, 0):
        loader.set_epoch(epoch)
        epochs.append([labels.clone() for _, labels in loader])
    assert all(torch.equal(a, b) for a, b in zip(epochs[0], epochs[2]))
    assert not all(torch.equal(a, b) for a, b in zip(epochs[0], epochs[1]))

    full = []
    loader.set_epoch(4)
    full = [(images.clone(), labels.clone()) for images, labels in loader]
    for start in (1, 5, 10):  # odd and even: the batch that resumes is on either worker
        loader.set_epoch(4, start_batch=start)
        resumed = list(loader)
        assert len(resumed) == len(full) - start
        for (xa, ya), (xb, yb) in zip(full[start:], resumed):
            assert torch.equal(xa, xb) and torch.equal(ya, yb)


def test_image_options(shards, unlabelled):
    image, label = next(iter(ShardDataset(shards, "test", rank=0, world_size=1)))
    assert image.shape == (1, 28, 28) and image.dtype == torch.uint8 and 0 <= label < 10
    rgb, _ = next(iter(ShardDataset(shards, "test", rgb=True, rank=0, world_size=1)))
    assert rgb.shape == (3, 28, 28) and torch.equal(rgb[0], image[0]) and torch.equal(rgb[2], image[0])
    pil, _ = next(iter(ShardDataset(shards, "test", output="pil", rank=0, world_size=1)))
    assert isinstance(pil, Image.Image) and pil.mode == "L"
    assert torch.equal(torch.tensor(np.asarray(pil))[None], image)
    labels = [label for _, label in ShardDataset(unlabelled, "train", rank=0, world_size=1)]
    assert labels == [-1] * 20

    def two_views(x):
        return [x.float() / 255, x.flip(-1).float() / 255]

    loader = make_loader(shards, "test", batch_size=50, transform=two_views, workers=0, rank=0, world_size=1)
    views, labels = next(iter(loader))
    assert isinstance(views, list) and len(views) == 2 and views[0].shape == (50, 3, 28, 28)
    assert torch.equal(views[1], views[0].flip(-1))


def test_loader_refuses_a_batch_larger_than_the_split(shards):
    with pytest.raises(UserError, match="fewer than one batch"):
        make_loader(shards, "test", batch_size=600, rank=0, world_size=2, workers=0)


def test_tensor_and_pil_decoders_give_the_same_pixels(tmp_path, mini_idx):
    """decode_tensor (torchvision's C decoders) and decode (PIL + standard_mode) must agree for
    every mode a user's files may come in, with and without rgb=True."""
    from torchvision.transforms.functional import pil_to_tensor

    images = read_idx(mini_idx / "t10k-images-idx3-ubyte.gz")[:8]
    src = tmp_path / "src"
    src.mkdir()
    for i, img in enumerate(images):
        gray = Image.fromarray(img)
        colour = Image.merge("RGB", [gray, gray.transpose(Image.FLIP_LEFT_RIGHT), gray.transpose(Image.FLIP_TOP_BOTTOM)])
        gray.save(src / f"{i}_gray.png")
        gray.save(src / f"{i}_gray.jpg", quality=85)
        colour.save(src / f"{i}_rgb.jpg", quality=85)
        colour.save(src / f"{i}_rgb.webp", quality=80)
        colour.convert("RGBA").save(src / f"{i}_rgba.png")
        colour.convert("P").save(src / f"{i}_palette.png")
        gray.convert("LA").save(src / f"{i}_la.png")
        colour.convert("CMYK").save(src / f"{i}_cmyk.jpg")
        Image.fromarray(img.astype(np.uint16) * 257).save(src / f"{i}_gray16.png")  # 16-bit: v * 257
    shards = shard(src, tmp_path / "shards", workers=1).parent
    for rgb in (False, True):
        tensors = ShardDataset(shards, "train", rgb=rgb, rank=0, world_size=1, return_key=True)
        pils = ShardDataset(shards, "train", rgb=rgb, output="pil", rank=0, world_size=1, return_key=True)
        n = 0
        for (tensor, _, key), (pil, _, key2) in zip(tensors, pils):
            assert key == key2
            assert torch.equal(tensor, pil_to_tensor(pil)), key
            assert tensor.shape[0] == (3 if rgb or not ("gray" in key or "_la" in key) else 1), key
            if "gray16" in key:  # scaled to 8 bits, not clipped: (v * 257) >> 8 == v
                assert torch.equal(tensor[0], torch.tensor(images[int(key.split("_")[0])]))
            n += 1
        assert n == 8 * 9


def test_batch_views_collate_batches_small_images_and_goes_per_image_above_the_limit():
    """--views auto's collate: a batch of one shape at most BATCH_VIEWS_MAX_PIXELS gets the
    whole-batch views of its first sample's seed; larger or mixed images get each image's own
    seeded per-image views (gray ones as 3 channels, as the per-image path decodes them)."""
    from sslctl.augment import build_views
    from sslctl.augment_batch import BatchViews
    from sslctl.data import BATCH_VIEWS_MAX_PIXELS, _BatchViews, seeded_call
    from sslctl.recipes import load_recipe

    aug = load_recipe("simclr", variant="small", overrides=["augment.crop_size=16"])["augment"]
    batch, per_image = BatchViews(aug, [0.5] * 3, [0.25] * 3), build_views(aug, [0.5] * 3, [0.25] * 3)
    collate = _BatchViews(batch, per_image)
    side = int(BATCH_VIEWS_MAX_PIXELS**0.5)
    rng = torch.Generator().manual_seed(0)
    for sizes in ([(side, side)] * 4, [(side + 8, side + 8)] * 4, [(20, 30), (30, 20), (20, 30), (28, 28)]):
        items = [(torch.randint(0, 256, (1 + 2 * (i % 2), h, w), dtype=torch.uint8, generator=rng), i, 100 + i)
                 for i, (h, w) in enumerate(sizes)]
        if len(set(sizes)) == 1:
            items = [(im[:1], *rest) for im, *rest in items]  # one shape: gray only
        views, labels = collate(items)
        assert labels.tolist() == [0, 1, 2, 3]
        if sizes[0] == (side, side):
            expected = seeded_call(batch, torch.stack([im for im, _, _ in items]), 100, keep_rng=True)
        else:
            singles = [seeded_call(per_image, im.expand(3, -1, -1).contiguous(), seed, keep_rng=True) for im, _, seed in items]
            expected = [torch.stack(v) for v in zip(*singles)]
        assert len(views) == len(expected) == 2
        for got, want in zip(views, expected):
            assert got.shape == (4, 3, 16, 16) and torch.equal(got, want), sizes


def test_a_reader_skips_an_image_whose_header_claims_too_many_pixels(tmp_path, monkeypatch):
    """A shard written by anyone may hold a decompression bomb: its header is checked before a
    pixel is decoded, and the sample is skipped and named; SSLCTL_MAX_PIXELS moves the limit."""
    import io

    from PIL import Image

    from sslctl.shardfmt import ShardWriter

    buf = io.BytesIO()
    Image.new("RGB", (32, 32), (200, 10, 10)).save(buf, "JPEG")
    jpg = bytearray(buf.getvalue())
    sof = jpg.index(b"\xff\xc0")
    bomb = bytes(jpg[: sof + 5]) + (60000).to_bytes(2, "big") * 2 + bytes(jpg[sof + 9 :])
    writer = ShardWriter(tmp_path / "x-000000.tar")
    for key, data in (("a", bytes(jpg)), ("bomb", bomb), ("b", bytes(jpg))):
        writer.add(key, "jpg", data, 0)
    writer.close()
    errors: list = []
    assert [key for key, _, _ in iter_shard(tmp_path / "x-000000.tar", errors=errors)] == ["a", "b"]
    assert len(errors) == 1 and errors[0][0].endswith("sample bomb")
    assert "60000 x 60000 = 3,600,000,000 pixels, over the limit of 100,000,000" in errors[0][1]
    monkeypatch.setenv("SSLCTL_MAX_PIXELS", "1000")
    errors = []
    assert list(iter_shard(tmp_path / "x-000000.tar", errors=errors)) == [] and len(errors) == 3
