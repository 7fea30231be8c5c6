"""Reading any WebDataset: foreign shards (webdataset's ShardWriter, Python's tarfile with pax
long names, GNU tar), brace patterns, directories without a manifest, and shards served by
real servers on 127.0.0.1 (Python's http.server; moto's S3 server read through s3fs):
sample counts, labels, pixels, the index beside the output, skipped shards, two gloo ranks.
"""

from __future__ import annotations

import functools
import http.server
import io
import json
import os
import shutil
import socket
import subprocess
import tarfile
import threading
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from sslctl.data import decode_tensor, iter_shard, make_loader
from sslctl.datasets import open_dataset
from sslctl.errors import UserError
from sslctl.shardfmt import Labels, split_shards
from sslctl.sources import read_idx
from tests.conftest import fork_ranks, free_port

N = 30  # images: 3 shards of 10 per writer
CLASSES = ["ankle", "bag", "coat"]


# ------------------------------------------------------------------------------ source images


@pytest.fixture(scope="module")
def images(mini_idx) -> list[tuple[str, bytes, int]]:
    """(file extension, encoded bytes, label) of N small Fashion-MNIST images: PNGs and JPEGs
    (gray and colour), labels 0..2."""
    pixels = read_idx(mini_idx / "t10k-images-idx3-ubyte.gz")[:N]
    out = []
    for i, img in enumerate(pixels):
        pil = Image.fromarray(img) if i % 3 else Image.fromarray(np.stack([img, img[::-1], 255 - img], -1))
        buf = io.BytesIO()
        ext = ("png", "jpg", "jpeg", "webp")[i % 4]
        pil.save(buf, {"jpg": "JPEG", "jpeg": "JPEG", "png": "PNG", "webp": "WEBP"}[ext])
        out.append((ext, buf.getvalue(), i % 3))
    return out


def expected(images) -> list[tuple[torch.Tensor, int]]:
    return [decode_tensor({ext: data, "cls": str(label).encode()}, rgb=True) for ext, data, label in images]


def write_webdataset(root: Path, images) -> Path:
    """webdataset.ShardWriter's own output: ext-000000.tar ..., keys sample000000, .cls members."""
    import webdataset as wds

    root.mkdir(parents=True)
    with wds.ShardWriter(str(root / "ext-%06d.tar"), maxcount=10, verbose=0) as sink:
        for i, (ext, data, label) in enumerate(images):
            sink.write({"__key__": f"sample{i:06d}", ext: data, "cls": label, "txt": f"caption {i}"})
    return root


LONG_DIR = "a-very-long-directory-name-" * 5 + "/release.v1.2"  # > 100 characters, dots in directories


def write_pax(root: Path, images) -> Path:
    """Python's tarfile (pax: long names get pax headers), labels as names in a .json field."""
    root.mkdir(parents=True)
    for s in range(3):
        with tarfile.open(root / f"pax-{s:06d}.tar", "w", format=tarfile.PAX_FORMAT) as tar:
            for i in range(10 * s, 10 * s + 10):
                ext, data, label = images[i]
                for suffix, payload in (("json", json.dumps({"meta": {"label": CLASSES[label]}}).encode()),
                                        (ext, data), ("txt", b"a sidecar")):
                    info = tarfile.TarInfo(f"{LONG_DIR}/img{i:04d}.{suffix}")
                    info.size = len(payload)
                    tar.addfile(info, io.BytesIO(payload))
    return root


def write_gnu(root: Path, images) -> Path:
    """GNU tar --format=gnu of a directory tree: ././@LongLink names, directory members."""
    tree = root.parent / "gnu-tree"
    for s in range(3):
        for i in range(10 * s, 10 * s + 10):
            ext, data, label = images[i]
            folder = tree / f"s{s}" / LONG_DIR
            folder.mkdir(parents=True, exist_ok=True)
            (folder / f"img{i:04d}.{ext}").write_bytes(data)
            (folder / f"img{i:04d}.cls").write_text(str(label))
    root.mkdir(parents=True)
    for s in range(3):
        subprocess.run(["tar", "--format=gnu", "--sort=name", "-cf", str(root / f"gnu-{s:06d}.tar"), "-C",
                        str(tree / f"s{s}"), "."], check=True)
    return root


@pytest.fixture(scope="module")
def foreign(tmp_path_factory, images) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("foreign")
    return {"webdataset": write_webdataset(root / "webdataset", images), "pax": write_pax(root / "pax", images),
            "gnu": write_gnu(root / "gnu", images)}


# ------------------------------------------------------------------------------ servers


class _Handler(http.server.SimpleHTTPRequestHandler):
    """Files of the served directory; counts requests; fails the paths in `fail_once` once (503)
    and answers those in `stall` only after 3 s."""

    requests: Counter
    fail_once: set
    stall: set

    def do_GET(self):
        self.requests[self.path] += 1
        if self.path in self.stall:
            time.sleep(3)
        if self.path in self.fail_once:
            self.fail_once.discard(self.path)
            self.send_error(503, "try again")
            return
        super().do_GET()

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def http_root(tmp_path_factory, foreign):
    """An HTTP server on 127.0.0.1 serving a copy of the foreign shards: (base URL, root, handler)."""
    pytest.importorskip("aiohttp", reason="reading http(s):// shards needs aiohttp (fsspec's HTTP backend): "
                        "pip install -e .[test]")
    root = tmp_path_factory.mktemp("www")
    for name, folder in foreign.items():
        shutil.copytree(folder, root / name)
    handler = type("Handler", (_Handler,), {"requests": Counter(), "fail_once": set(), "stall": set()})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(handler, directory=str(root)))
    server.handle_error = lambda request, address: None  # a client that gave up on a stalled answer
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", root, handler
    server.shutdown()


@pytest.fixture(autouse=True)
def quick_retries(monkeypatch):
    monkeypatch.setenv("SSLCTL_IO_RETRIES", "2")
    monkeypatch.setenv("SSLCTL_IO_BACKOFF", "0.05")


def _read_all(dataset: dict, split: str = "train") -> list[tuple[str, torch.Tensor, int]]:
    labels = Labels(dataset)
    return [(key, image, lab) for loc in split_shards(dataset, split) for key, image, lab in iter_shard(loc, rgb=True, labels=labels)]


# ------------------------------------------------------------------------------ tests


@pytest.mark.parametrize("writer", ["webdataset", "pax", "gnu"])
def test_foreign_shards_give_the_source_pixels_and_labels(foreign, images, tmp_path, writer):
    before = sorted(p.name for p in foreign[writer].iterdir())
    dataset = open_dataset(foreign[writer], index_dir=tmp_path, label_key="json:meta.label" if writer == "pax" else None)
    assert dataset["splits"]["train"]["count"] == N and [s["count"] for s in dataset["splits"]["train"]["shards"]] == [10] * 3
    assert dataset["classes"] == (CLASSES if writer == "pax" else ["0", "1", "2"])
    got = _read_all(dataset)
    for (key, image, label), (want_image, want_label) in zip(got, expected(images), strict=True):
        assert torch.equal(image, want_image) and label == want_label, key
    if writer != "webdataset":
        assert got[0][0] == f"{'.' + '/' if writer == 'gnu' else ''}{LONG_DIR}/img0000"  # webdataset's key rule
    # the index lives beside the output, never in the data
    assert sorted(p.name for p in foreign[writer].iterdir()) == before
    assert [p.name for p in tmp_path.iterdir()] == [Path(dataset["path"]).name]


def test_statistics_without_a_manifest_are_the_first_images_pixels(foreign, images, tmp_path):
    dataset = open_dataset(foreign["webdataset"], index_dir=tmp_path)
    pixels = torch.stack([im.float() / 255 for im, _ in expected(images)])  # all 28 x 28, N < STATS_SAMPLE
    assert dataset["image_size"] == [28, 28] and dataset["channels"] == 3 and dataset["stats_images"] == N
    # gray images count as R = G = B, as sslctl shard does
    assert np.allclose(dataset["mean"], pixels.mean(dim=(0, 2, 3)).tolist(), atol=1e-4)
    assert np.allclose(dataset["std"], pixels.std(dim=(0, 2, 3), unbiased=False).tolist(), atol=1e-4)


def test_http_pattern_is_indexed_once_and_read_like_local_disk(http_root, foreign, tmp_path):
    base, _, handler = http_root
    spec = base + "/webdataset/ext-{000000..000002}.tar"
    dataset = open_dataset(spec, index_dir=tmp_path)
    local = open_dataset(foreign["webdataset"], index_dir=tmp_path / "local")
    assert dataset["splits"]["train"]["count"] == N and dataset["classes"] == local["classes"]
    assert dataset["mean"] == local["mean"] and dataset["std"] == local["std"]
    assert [(k, im.tolist(), la) for k, im, la in _read_all(dataset)] == [(k, im.tolist(), la) for k, im, la in _read_all(local)]
    handler.requests.clear()
    again = open_dataset(spec, index_dir=tmp_path)  # the cached index: no request to the server
    assert not handler.requests and again["splits"] == dataset["splits"]


def test_s3_through_a_real_s3_server(foreign, images, tmp_path, monkeypatch, capsys, one_thread):
    why = "reading s3:// needs s3fs, and this test moto's S3 server: pip install -e .[test]"
    s3fs = pytest.importorskip("s3fs", reason=why)
    moto_server = pytest.importorskip("moto.server", reason=why)
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        for k, v in {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1",
                     "AWS_ENDPOINT_URL": f"http://{host}:{port}"}.items():
            monkeypatch.setenv(k, v)
        fs = s3fs.S3FileSystem(anon=False)
        fs.mkdir("bucket")
        for tar in sorted(foreign["webdataset"].glob("*.tar")):
            fs.put(str(tar), f"bucket/wds/{tar.name}")
        s3fs.S3FileSystem.clear_instance_cache()
        pattern = open_dataset("s3://bucket/wds/ext-{000000..000002}.tar", index_dir=tmp_path / "a")
        listing = open_dataset("s3://bucket/wds/", index_dir=tmp_path / "b")
        local = open_dataset(foreign["webdataset"], index_dir=tmp_path / "c")
        assert split_shards(listing, "train") == split_shards(pattern, "train")
        want = [(k, im.tolist(), la) for k, im, la in _read_all(local)]
        assert [(k, im.tolist(), la) for k, im, la in _read_all(pattern)] == want
        loader = make_loader(pattern, "train", batch_size=5, workers=2, shuffle=False, drop_last=False, rank=0, world_size=1)
        loader.set_epoch(0)
        assert sum(len(labels) for _, labels in loader) == N and loader.skipped() == {"shards": 0, "samples": 0}
        # the stages: pretrain two steps, then embed, straight from the bucket
        code, out, err = _sslctl(monkeypatch, capsys, "pretrain", "s3://bucket/wds/", "--recipe", "simclr", "--out",
                                 tmp_path / "run", "--max-steps", "2", "--set", "augment.crop_size=8", "--set",
                                 "optim.batch_size=8", "--workers", "0", "--device", "cpu", "--quiet")
        assert code == 0, err
        code, out, err = _sslctl(monkeypatch, capsys, "embed", tmp_path / "run", "s3://bucket/wds/ext-{000000..000002}.tar",
                                 "--workers", "0", "--quiet")
        assert code == 0, err
        from sslctl.embed import load_split

        assert load_split(out.strip(), "train")[1].tolist() == [label for _, _, label in images]
    finally:
        server.stop()


def test_missing_and_stalled_shards_are_skipped_and_a_url_that_cannot_be_opened_is_a_user_error(http_root, tmp_path,
                                                                                                   monkeypatch):
    base, root, handler = http_root
    (root / "stalled").mkdir()
    shutil.copy(root / "webdataset" / "ext-000000.tar", root / "stalled" / "ext-000000.tar")
    handler.stall.add("/stalled/ext-000000.tar")
    monkeypatch.setenv("SSLCTL_IO_TIMEOUT", "0.5")
    spec = base + "/webdataset/ext-{000000..000003}.tar::" + base + "/stalled/ext-000000.tar"  # 000003: no such file
    dataset = open_dataset(spec, index_dir=tmp_path)
    assert dataset["splits"]["train"]["count"] == N and dataset["splits"]["train"]["skipped"] == 2
    assert [s["path"] for s in dataset["skipped"]] == [base + "/webdataset/ext-000003.tar", base + "/stalled/ext-000000.tar"]
    assert "not found" in dataset["skipped"][0]["reason"] and "Timeout" in dataset["skipped"][1]["reason"]
    with pytest.raises(UserError, match="ext-000009.tar"):
        open_dataset(base + "/webdataset/ext-000009.tar", index_dir=tmp_path)
    with socket.socket() as s:  # a port where nothing listens: retried, then a UserError naming it
        s.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{s.getsockname()[1]}/x-000000.tar"
    with pytest.raises(UserError, match=closed.replace(".", r"\.")):
        open_dataset(closed, index_dir=tmp_path)


def test_transient_server_errors_are_retried(http_root, tmp_path):
    base, _, handler = http_root
    handler.fail_once.update({"/webdataset/ext-000001.tar"})
    handler.requests.clear()
    dataset = open_dataset(base + "/webdataset/ext-{000000..000002}.tar", index_dir=tmp_path)
    assert dataset["splits"]["train"]["count"] == N and not dataset["skipped"]
    assert handler.requests["/webdataset/ext-000001.tar"] == 2  # the 503, then the retry


def test_a_shard_truncated_mid_epoch_is_skipped_counted_and_the_epoch_completes(http_root, foreign, tmp_path):
    base, root, _ = http_root
    served = root / "truncated"
    shutil.copytree(foreign["webdataset"], served)
    dataset = open_dataset(base + "/truncated/ext-{000000..000002}.tar", index_dir=tmp_path)
    whole = (served / "ext-000001.tar").read_bytes()
    (served / "ext-000001.tar").write_bytes(whole[: len(whole) // 2])  # cut after the index was made
    loader = make_loader(dataset, "train", batch_size=5, workers=2, seed=0, rank=0, world_size=1)
    loader.set_epoch(0)
    batches = list(loader)
    assert len(batches) == len(loader) == N // 5  # every batch still comes, full
    skipped = loader.skipped()
    assert skipped["shards"] == 1 and 0 < skipped["samples"] < 10


def test_an_undecodable_image_is_replaced_and_counted(images, tmp_path):
    import webdataset as wds

    (tmp_path / "data").mkdir()
    with wds.TarWriter(str(tmp_path / "data" / "bad-000000.tar")) as sink:
        for i, (ext, data, label) in enumerate(images[:12]):
            sink.write({"__key__": f"s{i:02d}", ext: data[: len(data) // 3] if i == 4 else data, "cls": label})
    dataset = open_dataset(tmp_path / "data", index_dir=tmp_path / "out")
    assert dataset["splits"]["train"]["count"] == 12
    loader = make_loader(dataset, "train", batch_size=4, workers=0, shuffle=False, drop_last=False, rank=0, world_size=1)
    loader.dataset.return_key = True
    loader.set_epoch(0)
    keys = [k for _, _, ks in loader for k in ks]
    assert len(keys) == 12 and "s04" not in keys and keys[4] == "s03"  # replaced by the last readable one
    assert loader.skipped() == {"shards": 0, "samples": 1}


def test_pipe_urls_and_a_json_label_key(foreign, tmp_path):
    tars = sorted(foreign["pax"].glob("*.tar"))
    spec = "::".join(f"pipe:cat {t}" for t in tars)
    dataset = open_dataset(spec, index_dir=tmp_path, label_key="json:meta.label")
    assert dataset["splits"]["train"]["count"] == N and dataset["classes"] == CLASSES
    assert [la for _, _, la in _read_all(dataset)] == [i % 3 for i in range(N)]


def test_a_directory_of_split_named_shards_gives_those_splits(foreign, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    tars = sorted(foreign["webdataset"].glob("*.tar"))
    shutil.copy(tars[0], data / "train-000000.tar")
    shutil.copy(tars[1], data / "train-000001.tar")
    shutil.copy(tars[2], data / "test-000000.tar")
    dataset = open_dataset(data, index_dir=tmp_path / "out")
    assert {s: v["count"] for s, v in dataset["splits"].items()} == {"train": 20, "test": 10}
    both = open_dataset({"train": str(data / "train-{000000..000001}.tar"), "test": str(data / "test-000000.tar")},
                        index_dir=tmp_path / "out")
    assert both["splits"]["train"]["count"] == 20 and both["classes"] == dataset["classes"]


def test_resume_over_http_continues_at_the_same_sample(http_root, tmp_path):
    dataset = open_dataset(http_root[0] + "/webdataset/ext-{000000..000002}.tar", index_dir=tmp_path)

    def keys(start_batch):
        loader = make_loader(dataset, "train", batch_size=4, workers=2, seed=3, rank=0, world_size=1, shuffle_buffer=8)
        loader.dataset.return_key = True
        loader.set_epoch(1, start_batch)
        return [list(k) for _, _, k in loader]

    assert keys(3) == keys(0)[3:]


def _rank_keys(rank: int, port: int, spec: str, index_dir: str, out: str) -> None:
    from sslctl import distributed as dist

    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2",
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    assert dist.init_from_env("cpu")
    try:
        dataset = open_dataset(spec, index_dir=index_dir)  # one rank indexes, the other waits and reads its file
        loader = make_loader(dataset, "train", batch_size=3, workers=2, seed=1, drop_last=False)
        loader.dataset.return_key = True
        epochs = []
        for epoch in range(2):
            loader.set_epoch(epoch)
            epochs.append([k for _, _, keys in loader for k in keys])
        Path(out, f"rank{rank}.json").write_text(json.dumps(epochs))
    finally:
        torch.distributed.destroy_process_group()


def test_two_gloo_ranks_over_http_read_disjoint_samples_every_sample_once_per_epoch(http_root, tmp_path):
    """2 ranks x 2 loader workers over 3 shards: fewer shards than readers, still disjoint."""
    spec = http_root[0] + "/webdataset/ext-{000000..000002}.tar"
    fork_ranks(_rank_keys, free_port(), spec, str(tmp_path / "run"), str(tmp_path))
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    for epoch in range(2):
        a, b = ranks[0][epoch], ranks[1][epoch]
        assert not set(a) & set(b) and Counter(a + b) == Counter(f"sample{i:06d}" for i in range(N))
    assert ranks[0][0] != ranks[0][1]  # a new order each epoch
    assert len(list((tmp_path / "run").iterdir())) == 1  # one index


# ------------------------------------------------------------------------------ the stages


def _sslctl(monkeypatch, capsys, *args) -> tuple[int, str, str]:
    """The real entry point (sslctl.cli.main), in-process: (exit code, stdout, stderr)."""
    from sslctl.cli import main

    monkeypatch.setattr("sys.argv", ["sslctl", *map(str, args)])
    with pytest.raises(SystemExit) as exit_:
        main()
    out, err = capsys.readouterr()
    return exit_.value.code, out, err


def test_pretrain_embed_knn_and_inspect_over_http(http_root, foreign, tmp_path, monkeypatch, capsys, one_thread):
    base = http_root[0]
    train, test = base + "/pax/pax-{000000..000001}.tar", base + "/pax/pax-000002.tar"
    run = tmp_path / "run"
    code, out, err = _sslctl(monkeypatch, capsys, "pretrain", train, "--recipe", "simclr", "--out", run, "--max-steps", "2",
                             "--set", "augment.crop_size=8", "--set", "optim.batch_size=8", "--set", "schedule.warmup_epochs=0",
                             "--workers", "0", "--device", "cpu", "--quiet")
    assert code == 0, err
    assert out == f"{run}\n" and (run / "encoder.safetensors").is_file()
    (index,) = run.glob("data-index-*.json")  # beside the output; the served data is untouched
    assert sorted(p.name for p in (http_root[1] / "pax").iterdir()) == sorted(p.name for p in foreign["pax"].iterdir())
    assert [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()][-1] == 2

    feats = tmp_path / "f.safetensors"
    code, out, err = _sslctl(monkeypatch, capsys, "embed", run, "--split", f"train={train}", "--split", f"test={test}",
                             "--label-key", "json:meta.label", "--out", feats, "--workers", "0", "--quiet")
    assert code == 0, err
    from sslctl.embed import load_split, read_features_metadata

    assert read_features_metadata(feats)["classes"] == CLASSES
    (x, y), (_, y_test) = load_split(feats, "train"), load_split(feats, "test")
    assert x.shape[0] == 20 and y.tolist() == [i % 3 for i in range(20)] and y_test.tolist() == [i % 3 for i in range(20, 30)]
    code, out, err = _sslctl(monkeypatch, capsys, "knn", feats, "--k", "5", "-t", "0.1")
    (knn,) = [json.loads(line) for line in out.splitlines()]
    assert code == 0 and knn["n_bank"] == 20 and knn["n_eval"] == 10, err

    code, out, err = _sslctl(monkeypatch, capsys, "inspect", train, "--label-key", "json:meta.label", "--quiet")
    summary = json.loads(out)
    assert code == 0 and summary["kind"] == "webdataset" and summary["splits"]["train"]["count"] == 20
    assert summary["path"] == train  # read in memory: the spec names it
    assert summary["num_classes"] == 3
    code, out, err = _sslctl(monkeypatch, capsys, "inspect", index, "--quiet")  # the run's index file
    assert code == 0 and json.loads(out)["splits"]["train"]["count"] == 20


def test_a_shard_lost_during_pretraining_is_counted_in_metrics(http_root, foreign, tmp_path, monkeypatch, capsys, one_thread):
    base, root, _ = http_root
    shutil.copytree(foreign["pax"], root / "lost")
    spec, run = base + "/lost/pax-{000000..000001}.tar", tmp_path / "run"
    args = ["pretrain", spec, "--recipe", "simclr", "--out", run, "--set", "augment.crop_size=8", "--set",
            "optim.batch_size=8", "--set", "schedule.epochs=1", "--workers", "0", "--device", "cpu", "--quiet"]
    open_dataset(spec, index_dir=run)  # indexed while whole, then the second shard goes
    (root / "lost" / "pax-000001.tar").write_bytes(b"")
    code, out, err = _sslctl(monkeypatch, capsys, *args)
    assert code == 0, err
    last = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()][-1]
    assert last["step"] == 2 and last["skipped_shards"] >= 1 and last["skipped_samples"] >= 6  # 16 read, 10 missing
    assert "pax-000001.tar" in err


def test_a_url_that_cannot_be_opened_is_exit_2_naming_it(http_root, tmp_path, monkeypatch, capsys):
    missing = http_root[0] + "/nowhere/x-000000.tar"
    code, out, err = _sslctl(monkeypatch, capsys, "embed", "resnet18", missing, "--weights", "random", "--out",
                             tmp_path / "f.safetensors")
    assert code == 2 and missing in err and "Traceback" not in err and not out
