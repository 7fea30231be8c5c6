"""Reading shards (DESIGN.md §1): every stage after `shard` reads its images through this module.

    open_dataset(spec, index_dir=...)       sslctl shards or any WebDataset (sslctl.datasets)
    load_manifest(path)                     the manifest dict (+ "path": where it was read from)
    split_shards(manifest_or_path, split)   that split's shards (paths or URLs), in stored order
    iter_shard(shard, rgb=False)            (key, uint8 CHW tensor, label) in stored order
    ShardDataset(shards, split, ...)        an IterableDataset of (transform(image), label)
    make_loader(shards, split, ...)         batches with an equal len() on every rank

`shards` is what open_dataset returns, or a spec it opens (then any index is kept in memory).

How an epoch is split (exactly once per epoch across ranks x DataLoader workers): the split's
shards, in a (seed, epoch)-shuffled order, are laid end to end as one index space of samples.
Rank r takes a balanced contiguous range of it, and each worker a contiguous block of that. A
block may start or end inside a shard: the reader seeks over the samples before it without
reading them (on a local disk or an object store a seek; over plain HTTP or a pipe the bytes
are read and dropped), so this holds with any number of shards, even one. Samples are shuffled
by a buffer (`shuffled`) before decoding, seeded by (seed, epoch, rank, worker).

What cannot be read is skipped, counted and replaced: a shard that breaks off (truncated,
corrupt, unreachable after retries) or an undecodable image. Each missing sample is replaced by
the last readable one of the same worker's stream (with its own position's augmentation), so
every rank yields the same number of batches and a run's steps do not change; `skipped()`
reports the counts.
"""

from __future__ import annotations

import atexit
import io
import itertools
import math
import multiprocessing
import os
import random
import signal
import warnings
import weakref
import zlib
from typing import Callable, Iterator

import torch
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, default_collate, get_worker_info
from torchvision.transforms.functional import pil_to_tensor

from sslctl import console
from sslctl.datasets import open_dataset
from sslctl.errors import UserError
from sslctl.shardfmt import Labels, ShardError, image_bytes, label_of, load_manifest, split_shards
from sslctl.streams import shard_samples
from sslctl.sources import standard_mode

__all__ = ["open_dataset", "load_manifest", "split_shards", "iter_shard", "ShardDataset", "make_loader", "seeded_call", "decode", "decode_tensor"]

try:  # torchvision's C decoders: deprecated in 0.29 in favour of torchcodec, still the fastest here
    from torchvision.io import ImageReadMode, decode_image
except ImportError:  # a future torchvision without them: PIL decodes everything
    decode_image = None

def decode(sample: dict, *, rgb: bool = False, labels: Callable[[dict], int] = label_of) -> tuple[Image.Image, int]:
    """(PIL image in L or RGB mode, label or -1) from a raw webdataset sample; `labels` reads
    the label (default: the .cls member; a dataset's own: shardfmt.Labels(manifest))."""
    img = Image.open(io.BytesIO(image_bytes(sample)))
    img.load()
    img = standard_mode(img)
    if rgb and img.mode != "RGB":
        img = img.convert("RGB")
    return img, labels(sample)


def decode_tensor(sample: dict, *, rgb: bool = False, labels: Callable[[dict], int] = label_of) -> tuple[torch.Tensor, int]:
    """(uint8 C x H x W tensor, label or -1): the same pixels as `decode`, but decoded by
    torchvision's C decoders (libjpeg-turbo, libpng, libwebp), about twice as fast as PIL on
    small images. Anything but 1- or 3-channel images goes through PIL (standard_mode)."""
    data, image = image_bytes(sample), None
    palette = data[:4] == b"\x89PNG" and data[25:26] == b"\x03"  # torchvision would return the indices
    if decode_image is not None and not palette:
        try:
            with warnings.catch_warnings():  # its deprecation notice, once per image otherwise
                warnings.simplefilter("ignore", DeprecationWarning)
                image = decode_image(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.UNCHANGED)
        except RuntimeError:
            pass
    if image is None or image.shape[0] not in (1, 3) or image.dtype != torch.uint8:
        img, label = decode(sample, rgb=rgb, labels=labels)
        return pil_to_tensor(img), label
    if rgb and image.shape[0] == 1:
        image = image.expand(3, -1, -1).contiguous()
    return image, labels(sample)


def iter_shard(shard: str | os.PathLike, *, rgb: bool = False, labels: Callable[[dict], int] = label_of,
               errors: list | None = None) -> Iterator[tuple[str, torch.Tensor, int]]:
    """(key, uint8 C x H x W image, label or -1) for every sample of one shard (a path or a
    URL), in stored order. errors=None: a corrupt image or a broken shard raises; with a list,
    they are skipped and (where, reason) appended to it."""
    try:
        for sample in shard_samples(shard, load=getattr(labels, "wants", None)):
            try:
                image, label = decode_tensor(sample, rgb=rgb, labels=labels)
            except Exception as err:  # noqa: BLE001 - PIL and torchvision raise many kinds
                if errors is None:
                    raise
                errors.append((f"{shard} sample {sample['__key__']}", f"undecodable image ({err})"))
                continue
            yield sample["__key__"], image, label
    except ShardError as err:
        if errors is None:
            raise
        errors.append((str(shard), err.reason))


def shuffled(samples: Iterator, size: int, rng: random.Random) -> Iterator:
    """`samples` through a shuffle buffer of `size`: a random one of the buffered samples comes
    out for each that goes in. The order is exactly webdataset's shuffle(size, initial=size)
    (it takes two samples per step while the buffer fills), which sslctl used before owning
    this buffer, so seeded orders and resumed runs stay what they were."""
    samples, buf = iter(samples), []
    for sample in samples:
        buf.append(sample)
        if len(buf) < size:
            buf.extend(itertools.islice(samples, 1))
        if len(buf) >= size:
            yield _pick(buf, rng)
    while buf:
        yield _pick(buf, rng)


def _pick(buf: list, rng: random.Random):
    k = rng.randint(0, len(buf) - 1)
    sample = buf[k]
    buf[k] = buf[-1]
    buf.pop()
    return sample


def _balanced(total: int, parts: int, i: int) -> tuple[int, int]:
    return total * i // parts, total * (i + 1) // parts


class ShardDataset(IterableDataset):
    """(transform(image), label) for one split, each sample once per epoch across ranks x workers.

    image: uint8 C x H x W tensor (output="tensor") or a PIL image (output="pil"); grayscale
    shards give C = 1 unless rgb=True. label: the class index, -1 when unlabelled.
    shuffle_buffer=0 reads in stored order (one rank, one worker: exactly the manifest's order).
    batch_size/drop_last (set by make_loader): blocks per worker are whole batches, and with
    drop_last each rank yields exactly total // (batch_size * world_size) batches.
    return_key=True yields (image, label, key); return_seed=True (image, label, seed), the
    sample's (seed, epoch, position) seed, for a transform applied to whole batches later.
    """

    def __init__(
        self,
        shards,
        split: str,
        *,
        transform: Callable | None = None,
        shuffle_buffer: int = 0,
        seed: int = 0,
        rgb: bool = False,
        output: str = "tensor",
        rank: int | None = None,
        world_size: int | None = None,
        batch_size: int | None = None,
        drop_last: bool = False,
        return_key: bool = False,
        return_seed: bool = False,
    ):
        if output not in ("tensor", "pil"):
            raise UserError(f"output={output!r}: expected 'tensor' or 'pil'")
        from sslctl import distributed

        self.manifest = open_dataset(shards)  # a dict as it is; a spec indexed in memory
        self.paths = split_shards(self.manifest, split)
        self.counts = [s["count"] for s in self.manifest["splits"][split]["shards"]]
        self.labels = Labels(self.manifest)
        self.total = sum(self.counts)
        self.split, self.transform, self.shuffle_buffer, self.seed = split, transform, shuffle_buffer, seed
        self.rgb, self.output, self.return_key, self.return_seed = rgb, output, return_key, return_seed
        self.rank = distributed.rank() if rank is None else rank
        self.world_size = distributed.world_size() if world_size is None else world_size
        if not 0 <= self.rank < self.world_size:
            raise UserError(f"rank {self.rank} is outside world size {self.world_size}")
        self.batch_size, self.drop_last = batch_size, drop_last
        # Shared with DataLoader workers (also persistent ones), so set_epoch reaches them.
        self._epoch = multiprocessing.RawValue("q", 0)
        self._start_batch = multiprocessing.RawValue("q", 0)
        self._skipped = multiprocessing.Array("q", 2)  # broken shards, replaced samples (all workers)
        self._decode_warnings = 0  # per process (each worker has its own copy)

    def skipped(self) -> dict[str, int]:
        """What could not be read since this dataset was made, over all epochs and workers:
        "shards" that broke (unreachable, truncated, corrupt) and "samples" replaced by another
        sample of the same worker's stream (their undecodable images, or a broken shard's rest)."""
        return {"shards": self._skipped[0], "samples": self._skipped[1]}

    def _count_skipped(self, shards: int = 0, samples: int = 0) -> None:
        with self._skipped.get_lock():
            self._skipped[0] += shards
            self._skipped[1] += samples

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Order for this epoch; start_batch > 0 resumes mid-epoch (needs batch_size) and yields
        exactly the batches an uninterrupted epoch would have yielded from there on."""
        if start_batch and not self.batch_size:
            raise ValueError("start_batch needs batch_size (use make_loader)")
        self._epoch.value, self._start_batch.value = epoch, start_batch

    def _rank_range(self) -> tuple[int, int]:
        lo, hi = _balanced(self.total, self.world_size, self.rank)
        if self.batch_size and self.drop_last:
            hi = lo + self.total // (self.batch_size * self.world_size) * self.batch_size
        return lo, hi

    def __len__(self) -> int:
        lo, hi = self._rank_range()
        return hi - lo

    def num_batches(self) -> int:
        return math.ceil(len(self) / self.batch_size)

    def _worker_block(self, worker: int, workers: int, start_batch: int) -> tuple[int, int, int]:
        """(first, stop) sample offsets within this rank's range for `worker`, and how many of its
        leading samples were already consumed (start_batch resume).

        With batches: global batch j goes to worker (j - start_batch) % workers, as the
        DataLoader's round-robin hands them out; each worker's batches form one block."""
        n = len(self)
        if not self.batch_size:
            first, stop = _balanced(n, workers, worker)
            return first, stop, 0
        nb = self.num_batches()

        def batches_of(w: int) -> int:  # batches that worker w yields over a whole epoch
            return len(range(w, nb, workers))

        role = (worker + start_batch) % workers  # the worker that would have served batch start_batch
        first = sum(batches_of(w) for w in range(role)) * self.batch_size
        stop = min(n, first + batches_of(role) * self.batch_size)
        return first, stop, len(range(role, start_batch, workers)) * self.batch_size

    def _raw(self, epoch: int, first: int, stop: int) -> Iterator[dict]:
        """Raw samples [first, stop) of this rank's range, shards laid out in the epoch's order,
        the index space rotated by the epoch's offset (wrapping around its end)."""
        order = list(range(len(self.paths)))
        if self.shuffle_buffer:
            random.Random(f"{self.seed}:{epoch}").shuffle(order)
        lo, _ = self._rank_range()
        shift = self._rotation(epoch)
        a, b = lo + first + shift, lo + stop + shift
        for seg_a, seg_b in ((a, min(b, self.total)), (max(a, self.total) - self.total, b - self.total)):
            if seg_a < seg_b:
                yield from self._span(order, seg_a, seg_b)

    def _rotation(self, epoch: int) -> int:
        """drop_last leaves the tail of each rank's range out of the epoch. Shuffled, the index
        space starts at a (seed, epoch) offset, so the samples left out change every epoch
        (with one shard, e.g. a fine-tuning subset, the same ones would otherwise never be seen)."""
        per_step = (self.batch_size or 1) * self.world_size
        if not self.shuffle_buffer or not self.drop_last or self.total % per_step == 0:
            return 0  # every sample is used (the same test on every rank)
        return random.Random(f"{self.seed}:{epoch}:rotation").randrange(self.total)

    def _span(self, order: list[int], first: int, stop: int) -> Iterator[dict | None]:
        offset = 0
        for i in order:
            a, b = max(first - offset, 0), min(stop - offset, self.counts[i])
            if a < b:
                yield from self._shard(i, a, b)
            offset += self.counts[i]
            if offset >= stop:
                break

    def _shard(self, i: int, a: int, b: int) -> Iterator[dict | None]:
        """Samples a..b-1 of shard i, exactly b - a items: where the shard breaks off (or holds
        fewer than its count), None for each sample missing, which __iter__ replaces, so every
        rank still yields its number of batches and DDP ranks stay in step."""
        n, reason = 0, None
        try:
            for sample in shard_samples(self.paths[i], a, b, load=self.labels.wants):
                n += 1
                yield sample
        except ShardError as err:
            reason = err.reason
        if n < b - a:
            self._count_skipped(shards=1)
            console.warn(f"{self.paths[i]}: {reason or f'holds {a + n} samples, {self.counts[i]} were counted'}; "
                         f"{b - a - n} sample(s) of it replaced by others this epoch")
            yield from itertools.repeat(None, b - a - n)

    def __iter__(self):
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        epoch, start_batch = self._epoch.value, self._start_batch.value
        first, stop, done = self._worker_block(worker, workers, start_batch)
        samples = self._raw(epoch, first, stop)
        if self.shuffle_buffer:
            role = (worker + start_batch) % workers
            rng = random.Random(f"{self.seed}:{epoch}:{self.rank}:{role}")
            samples = shuffled(samples, self.shuffle_buffer, rng)
        base = zlib.crc32(f"{self.seed}:{epoch}".encode()) + self._rank_range()[0] + first
        decoder = decode_tensor if self.output == "tensor" else decode
        good, owed = None, []  # the last readable sample; positions still waiting for one
        for i, sample in enumerate(samples):
            if i < done:
                continue  # consumed before the interruption: skipped before decoding
            decoded = self._decode(sample, decoder)
            if decoded is not None:
                good = (*decoded, sample["__key__"])
            else:
                self._count_skipped(samples=1)
                if good is None:
                    owed.append(i)
                    continue
            for position in [*owed, i]:
                yield self._item(*good, base + position, keep_rng=info is None)
            owed = []

    def _decode(self, sample: dict | None, decoder) -> tuple | None:
        """(image, label), or None for a missing sample (a broken shard's, `_shard` warned) or
        an undecodable image (a warning for the first few of each worker)."""
        if sample is None:
            return None
        try:
            return decoder(sample, rgb=self.rgb, labels=self.labels)
        except Exception as err:  # noqa: BLE001 - a corrupt image: PIL and torchvision raise many kinds
            self._decode_warnings += 1
            if self._decode_warnings <= 5:
                console.warn(f"{sample['__url__']}: sample {sample['__key__']}: undecodable image ({err}); replaced")
            return None

    def _item(self, image, label: int, key: str, seed: int, keep_rng: bool) -> tuple:
        if self.transform is not None:
            image = seeded_call(self.transform, image, seed, keep_rng=keep_rng)
        if self.return_key:
            return image, label, key
        if self.return_seed:
            return image, label, seed
        return image, label


def seeded_call(transform: Callable, x, seed: int, keep_rng: bool):
    """transform(x) with torch's CPU generator seeded by `seed` (a sample's or a batch's (seed,
    epoch, position)), so the augmentation is the same after a mid-epoch resume and in whichever
    worker draws it (exact resume, sslctl/train.py). keep_rng (in the training process): the
    training's random stream is put back afterwards. Only the CPU generator is seeded: every
    augmentation draws there, and torch.manual_seed would also reseed the CUDA generators."""
    if not keep_rng:
        torch.default_generator.manual_seed(seed % 2**32)
        return transform(x)
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(seed % 2**32)
        return transform(x)


class ShardLoader:
    """Batches of (images or list of view tensors, labels), `len()` batches per epoch."""

    def __init__(self, dataset: ShardDataset, loader: DataLoader, steps: int):
        self.dataset, self.loader, self.steps = dataset, loader, steps
        self._start = 0
        if loader.num_workers > 0:
            _LIVE.add(self)

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Call before iterating each epoch; start_batch resumes mid-epoch."""
        self.dataset.set_epoch(epoch, start_batch)
        self._start = start_batch

    def __len__(self) -> int:
        return self.steps

    def skipped(self) -> dict[str, int]:
        """Broken shards and replaced samples so far (ShardDataset.skipped), for metrics."""
        return self.dataset.skipped()

    def close(self) -> None:
        """Stop the persistent workers now. They ignore SIGTERM (_leave_signals_to_the_main_process),
        so the SIGTERM that multiprocessing sends its daemon children at interpreter exit would
        leave the exit waiting on them forever: after an error the workers must be told to stop.
        The DataLoader has no public call for it; this is torch's own shutdown (as Lightning does)."""
        iterator = getattr(self.loader, "_iterator", None)
        if iterator is not None and hasattr(iterator, "_shutdown_workers"):
            iterator._shutdown_workers()
        self.loader._iterator = None
        _LIVE.discard(self)

    def __iter__(self):
        remaining = self.steps - self._start
        for i, batch in enumerate(self.loader):
            if i >= remaining:  # never more than len() (drop_last=False on uneven ranks)
                break
            yield batch


# Loaders with workers not yet closed. Registered after torch imported multiprocessing, so this
# exit hook runs before multiprocessing's own (atexit is last-in, first-out) on every way out.
_LIVE: "weakref.WeakSet[ShardLoader]" = weakref.WeakSet()


@atexit.register
def _close_live_loaders() -> None:
    for loader in list(_LIVE):
        loader.close()


def default_workers(world_size: int = 1) -> int:
    """DataLoader workers per rank: the cores this rank can use, less one for the main loop."""
    cores = len(os.sched_getaffinity(0)) // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", world_size)))
    return max(0, min(16, cores - 1))


def make_loader(
    shards,
    split: str,
    *,
    batch_size: int,
    transform: Callable | None = None,
    workers: int | None = None,
    seed: int = 0,
    shuffle: bool = True,
    drop_last: bool = True,
    rgb: bool = True,
    rank: int | None = None,
    world_size: int | None = None,
    pin_memory: bool = False,
    shuffle_buffer: int = 2000,
    output: str = "tensor",
    batch_transform: Callable | None = None,
) -> ShardLoader:
    """A DataLoader over one split; `batch_size` is per rank.

    batch_transform: called once per batch in the loader's worker on the batch's uint8 images
    (a B x C x H x W tensor, or a list when their shapes differ), with torch's CPU RNG seeded by
    the batch's first sample; batches are (its output, labels). With a transform as well, only
    batches of small images of one shape go through it; the others go image by image through
    the transform (`_BatchViews`).

    With drop_last every rank gets exactly len() = total // (batch_size * world_size) batches,
    so DDP ranks finish an epoch together. Call `.set_epoch(e)` before each epoch."""
    dataset = ShardDataset(
        shards, split, transform=None if batch_transform else transform, shuffle_buffer=shuffle_buffer if shuffle else 0, seed=seed, rgb=rgb,
        output=output, rank=rank, world_size=world_size, batch_size=batch_size, drop_last=drop_last,
        return_seed=batch_transform is not None,
    )
    steps = dataset.num_batches()
    if drop_last and steps == 0:
        raise UserError(
            f"{dataset.manifest['path']}: split {split!r} has {dataset.total} images, fewer than one batch of "
            f"{batch_size} x {dataset.world_size} rank(s); lower the batch size"
        )
    workers = default_workers(dataset.world_size) if workers is None else workers
    if workers:
        _kill_workers_at_exit()
    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        num_workers=workers,
        pin_memory=pin_memory,
        drop_last=False,  # blocks are whole batches already; the last partial one is wanted
        persistent_workers=workers > 0,
        prefetch_factor=4 if workers > 0 else None,
        worker_init_fn=_leave_signals_to_the_main_process,
        collate_fn=(_BatchViews(batch_transform, transform) if batch_transform is not None
                    else collate_images if transform is None and output == "tensor" else None),
    )
    return ShardLoader(dataset, loader, steps)


def collate_images(batch: list[tuple]) -> tuple:
    """Undecorated images: one uint8 B x C x H x W tensor when they share a shape, else the list
    (an image folder of mixed sizes or of gray and colour images; BatchViews takes either); the
    other fields (label, and key or seed) collated as the DataLoader's default does."""
    images = [item[0] for item in batch]
    same = all(im.shape == images[0].shape for im in images)
    return (torch.stack(images) if same else images), *default_collate([item[1:] for item in batch])


# Whole-batch views win on small images and lose on large ones: one CPU thread, MoCo v2's
# views, batch / per-image images/s = 4.9x at 32 px, 2.0x at 64, 1.2x at 96 and 128, 1.1x at
# 160, 0.9x at 192, 0.8x at 256 (`python bench/augment_views.py --sizes ...`, quiet machine).
# Larger images, or batches of mixed shapes, go image by image.
BATCH_VIEWS_MAX_PIXELS = 128 * 128


class _BatchViews:
    """collate_fn: the views of a whole batch in one call of `batch`, seeded by its first
    sample's (seed, epoch, position), so a batch's views do not depend on which worker makes
    them (exact resume). With `per_image` (--views auto), a batch of mixed shapes or of images
    above BATCH_VIEWS_MAX_PIXELS goes image by image through it instead, each image seeded by
    its own sample: the views --views per-image makes."""

    def __init__(self, batch: Callable, per_image: Callable | None = None):
        self.batch, self.per_image = batch, per_image

    def __call__(self, batch: list[tuple[torch.Tensor, int, int]]):
        images, labels, _seeds = collate_images(batch)
        keep_rng = get_worker_info() is None
        small = isinstance(images, torch.Tensor) and images.shape[-2] * images.shape[-1] <= BATCH_VIEWS_MAX_PIXELS
        if self.per_image is None or small:
            return seeded_call(self.batch, images, batch[0][2], keep_rng=keep_rng), labels
        views = [seeded_call(self.per_image, _rgb(image), seed, keep_rng=keep_rng) for image, _, seed in batch]
        return [torch.stack(view) for view in zip(*views)], labels


def _rgb(image: torch.Tensor) -> torch.Tensor:
    """A gray uint8 image as decode_tensor(rgb=True) gives it (the per-image path's input)."""
    return image.expand(3, -1, -1).contiguous() if image.shape[0] == 1 else image


_EXIT_HOOK: list = []


def _kill_workers_at_exit() -> None:
    """Loader workers ignore SIGTERM (below), and at exit multiprocessing terminates daemonic
    children with SIGTERM and then joins them: a loader still alive then (a script's global,
    a failed test's traceback) would hang the exit forever. This handler, registered after
    multiprocessing's own and so run before it, kills them instead."""
    if not _EXIT_HOOK:
        import atexit

        _EXIT_HOOK.append(atexit.register(_kill_daemonic_children))


def _kill_daemonic_children() -> None:
    children = [p for p in multiprocessing.active_children() if p.daemon]
    if children:
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)  # torch's handler would report the kills as worker failures
        for p in children:
            p.kill()


def _leave_signals_to_the_main_process(worker_id: int) -> None:
    """Ctrl-C and torchrun/SLURM's SIGTERM reach the whole process group. A worker killed by
    them makes the main process raise mid-step, before it can save a checkpoint; so workers
    ignore them, and the main process finishes its step, saves, and shuts the workers down."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
