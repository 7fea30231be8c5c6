"""What `sslctl shard` reads a folder as, and why: class folders only when the tree is consistent;
a tree that looks labelled but has stray images or empty class folders is refused (exit 2)
naming them, with the flags that force a reading; link loops and unreadable folders are exit 2
naming the folder. Real folders of real JPEG files (from the embedded Fashion-MNIST)."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest
from PIL import Image

from sslctl.data import load_manifest
from sslctl.errors import UserError
from sslctl.paths import EMBEDDED_DATASET
from sslctl.sources import open_source, read_idx
from tests.conftest import run_bounded, run_cli

IMAGES = read_idx(EMBEDDED_DATASET / "t10k-images-idx3-ubyte.gz")


def jpegs(folder: Path, n: int, start: int = 0) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / f"{i:04d}.jpg" for i in range(start, start + n)]
    for path, image in zip(paths, IMAGES[start : start + n]):
        Image.fromarray(image).save(path, quality=90)
    return paths


def imagenet_like(root: Path, classes=("cat", "dog", "fox"), per_class: int = 4) -> Path:
    """train/CLASS/*.jpg and val/CLASS/*.jpg, the ImageNet layout."""
    n = 0
    for split in ("train", "val"):
        for name in classes:
            jpegs(root / split / name, per_class, start=n)
            n += per_class
    return root


def refused(path: Path, *says: str, kind: str = "auto") -> str:
    with pytest.raises(UserError) as err:
        open_source(path, kind)
    for text in says:
        assert text in str(err.value), (text, str(err.value))
    return str(err.value)


def test_a_consistent_tree_is_class_folders_and_says_so(tmp_path, capsys):
    src = open_source(imagenet_like(tmp_path / "data"))
    assert src.kind == "folder" and src.classes == ["cat", "dog", "fox"]
    assert {s: len(items) for s, items in src.splits.items()} == {"train": 12, "val": 12}
    err = capsys.readouterr().err
    assert "class folders" in err and "3 classes" in err and "train, val" in err


def test_one_stray_image_at_the_train_root_is_refused(tmp_path):
    data = imagenet_like(tmp_path / "data")
    shutil.copy(data / "train" / "cat" / "0000.jpg", data / "train" / "stray.jpg")
    message = refused(data, "train/stray.jpg", "CLASS/IMAGE", "--source folder", "--source images")
    assert "1 image" in message


def test_one_stray_image_in_a_sub_folder_of_a_class_is_refused(tmp_path):
    data = imagenet_like(tmp_path / "data")
    jpegs(data / "val" / "dog" / "more", 1, start=100)
    refused(data, "val/dog/more/0100.jpg", "--source folder", "--source images")


def test_a_split_of_loose_images_beside_class_folders_is_refused(tmp_path):
    data = tmp_path / "data"
    for name in ("cat", "dog"):
        jpegs(data / "train" / name, 4, start=0 if name == "cat" else 4)
    jpegs(data / "test", 3, start=20)  # an unlabelled test set, as some downloads ship
    refused(data, "test/0020.jpg", "3 images", "--source images")


def test_forcing_folder_keeps_the_labels_and_skips_the_strays(tmp_path, capsys):
    data = imagenet_like(tmp_path / "data")
    shutil.copy(data / "train" / "cat" / "0000.jpg", data / "train" / "stray.jpg")
    src = open_source(data, "folder")
    assert src.classes == ["cat", "dog", "fox"] and len(src.splits["train"]) == 12
    assert all("stray" not in item.path for item in src.splits["train"])
    assert "train/stray.jpg" in capsys.readouterr().err  # skipped, and said so
    forced = open_source(data, "images")
    assert forced.classes is None and len(forced.splits["train"]) == 13


def test_an_empty_class_folder_is_refused(tmp_path):
    data = imagenet_like(tmp_path / "data")
    (data / "train" / "eel").mkdir()
    refused(data, "train/eel", "no images")
    (data / "val" / "eel").mkdir()
    refused(data, "train/eel", "val/eel")
    jpegs(data / "train" / "eel", 2, start=50)  # a class with no val images is still a class
    assert open_source(data).classes == ["cat", "dog", "eel", "fox"]


def test_unlabelled_trees_stay_unlabelled_and_say_why(tmp_path, capsys):
    photos = tmp_path / "photos"
    jpegs(photos, 12)
    jpegs(photos / "edited", 2, start=12)
    jpegs(photos / "best", 2, start=14)  # two sub-folders, but most images are loose: not classes
    src = open_source(photos)
    assert src.kind == "images" and len(src.splits["train"]) == 16
    err = capsys.readouterr().err
    assert "unlabelled images" in err and "12 images directly in" in err
    dated = tmp_path / "dated"
    for year in ("2023", "2024"):
        jpegs(dated / year / "01", 3)
    assert open_source(dated).kind == "images"
    assert "below the first level" in capsys.readouterr().err


def test_a_symbolic_link_loop_is_exit_2_naming_the_link(tmp_path):
    data = tmp_path / "data"
    jpegs(data / "a", 3)
    os.symlink("..", data / "a" / "back")
    refused(data, str(data / "a" / "back"), "symbolic link loop")
    res = run_cli("shard", str(data), str(tmp_path / "out"))
    assert res.returncode == 2 and "Traceback" not in res.stderr and "symbolic link loop" in res.stderr, res.stderr


def _without_root_read_rights():
    """In the child, before exec: root reads every folder; drop the two capabilities that let it
    (CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH) so a mode-000 folder is unreadable as for anyone."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    for cap in (1, 2):
        if libc.prctl(24, cap, 0, 0, 0) != 0:  # PR_CAPBSET_DROP
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP)")


@pytest.mark.skipif(sys.platform != "linux", reason="drops root's read rights with Linux's prctl")
def test_an_unreadable_folder_is_exit_2_naming_it(tmp_path):
    data = tmp_path / "data"
    jpegs(data / "cat", 3)
    jpegs(data / "dog", 3)
    os.chmod(data / "dog", 0o000)
    try:
        res = run_bounded([sys.executable, "-m", "sslctl", "shard", str(data), str(tmp_path / "out")], timeout=300,
                          preexec_fn=_without_root_read_rights if os.geteuid() == 0 else None)
    finally:
        os.chmod(data / "dog", 0o755)
    if "prctl(PR_CAPBSET_DROP)" in res.stderr:
        pytest.skip("running as root without the right to drop its read rights (CAP_SETPCAP)")
    assert res.returncode == 2, res.stderr
    assert "Traceback" not in res.stderr and str(data / "dog") in res.stderr and "ermission" in res.stderr, res.stderr


def test_the_cli_refuses_a_stray_and_writes_nothing(tmp_path):
    data = imagenet_like(tmp_path / "data")
    shutil.copy(data / "train" / "cat" / "0000.jpg", data / "train" / "stray.jpg")
    res = run_cli("shard", str(data), str(tmp_path / "out"))
    assert res.returncode == 2 and "Traceback" not in res.stderr and res.stdout == ""
    assert "train/stray.jpg" in res.stderr and not (tmp_path / "out" / "manifest.json").exists()
    res = run_cli("shard", str(data), str(tmp_path / "out"), "--source", "folder", "--quiet")
    assert res.returncode == 0, res.stderr
    manifest = load_manifest(tmp_path / "out")
    assert manifest["classes"] == ["cat", "dog", "fox"] and manifest["splits"]["train"]["count"] == 12
