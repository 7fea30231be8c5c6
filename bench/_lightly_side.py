"""lightly's side of bench/compare.py (docs/spec/protocols.md B1/B2): MoCo v2, SimCLR and BYOL written the
way lightly's documentation examples write them (lightly examples/pytorch/moco.py, simclr.py,
byol.py): a torchvision dataset with lightly's view transform, a plain DataLoader, the model as
`backbone` + lightly heads (+ deep-copied momentum branch with `deactivate_requires_grad`),
`update_momentum` at the start of a step, lightly's loss, SGD.

Where the examples use other numbers, the protocol's are used, and the same as sslctl's recipe
gets through `--set` in compare.py (see SSLCTL_OVERRIDES there):
  model      torchvision resnet18, small stem (3x3 stride-1 conv1, no max-pool), fc removed
  batch      128 source images, SGD lr 0.06 x bs/128, momentum 0.9, wd 5e-4 on every parameter,
             cosine per step over one epoch (lightly.utils.scheduler.cosine_schedule)
  MoCo v2    MoCoProjectionHead(512, 512, 128), NTXentLoss(0.1, memory bank 4096), m = 0.99
  SimCLR     SimCLRProjectionHead(512, 512, 128), NTXentLoss(0.5), views through the backbone apart
  BYOL       BYOLProjectionHead(512, 4096, 256) / BYOLPredictionHead(256, 4096, 256),
             NegativeCosineSimilarity, tau = cosine_schedule(step, .., 0.99, 1)
  views      MoCoV2Transform / SimCLRTransform(cj_strength 0.5) / BYOLTransform at 32 px,
             scale 0.08-1, no blur; Fashion-MNIST's gray replicated to RGB first

Run as a script it trains and writes a JSON record (per-step times, loader waits, losses) and the
backbone as an sslctl encoder.safetensors, so both libraries are evaluated by the same code.
"""

from __future__ import annotations

import time

T_START = time.time()  # before the heavy imports: a wall-clock budget counts them too

import argparse  # noqa: E402
import copy  # noqa: E402
import gzip  # noqa: E402
import json  # noqa: E402
import shutil  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
import torchvision  # noqa: E402
from torch import nn  # noqa: E402

from lightly.loss import NegativeCosineSimilarity, NTXentLoss  # noqa: E402
from lightly.models.modules import BYOLPredictionHead, BYOLProjectionHead, MoCoProjectionHead, SimCLRProjectionHead  # noqa: E402
from lightly.models.utils import deactivate_requires_grad, update_momentum  # noqa: E402
from lightly.transforms import BYOLTransform, BYOLView1Transform, BYOLView2Transform, MoCoV2Transform, SimCLRTransform  # noqa: E402
from lightly.transforms.utils import IMAGENET_NORMALIZE  # noqa: E402
from lightly.utils.scheduler import cosine_schedule  # noqa: E402

METHODS = ("moco_v2", "simclr", "byol")
BATCH, LR, MOMENTUM, WEIGHT_DECAY = 128, 0.06, 0.9, 5e-4
IMAGE_SIZE = 32


# ---------------------------------------------------------------------------------- models


def resnet18_small() -> nn.Module:
    """torchvision resnet18 with the small-image stem; its fc is dropped by the Sequential below."""
    resnet = torchvision.models.resnet18()
    resnet.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
    resnet.maxpool = nn.Identity()
    return resnet


class MoCo(nn.Module):
    def __init__(self, backbone: nn.Module):
        super().__init__()
        self.backbone = backbone
        self.projection_head = MoCoProjectionHead(512, 512, 128)
        self.backbone_momentum = copy.deepcopy(self.backbone)
        self.projection_head_momentum = copy.deepcopy(self.projection_head)
        deactivate_requires_grad(self.backbone_momentum)
        deactivate_requires_grad(self.projection_head_momentum)

    def forward(self, x):
        return self.projection_head(self.backbone(x).flatten(start_dim=1))

    def forward_momentum(self, x):
        return self.projection_head_momentum(self.backbone_momentum(x).flatten(start_dim=1)).detach()


class SimCLR(nn.Module):
    def __init__(self, backbone: nn.Module):
        super().__init__()
        self.backbone = backbone
        self.projection_head = SimCLRProjectionHead(512, 512, 128)

    def forward(self, x):
        return self.projection_head(self.backbone(x).flatten(start_dim=1))


class BYOL(nn.Module):
    def __init__(self, backbone: nn.Module):
        super().__init__()
        self.backbone = backbone
        self.projection_head = BYOLProjectionHead(512, 4096, 256)
        self.prediction_head = BYOLPredictionHead(256, 4096, 256)
        self.backbone_momentum = copy.deepcopy(self.backbone)
        self.projection_head_momentum = copy.deepcopy(self.projection_head)
        deactivate_requires_grad(self.backbone_momentum)
        deactivate_requires_grad(self.projection_head_momentum)

    def forward(self, x):
        return self.prediction_head(self.projection_head(self.backbone(x).flatten(start_dim=1)))

    def forward_momentum(self, x):
        return self.projection_head_momentum(self.backbone_momentum(x).flatten(start_dim=1)).detach()


class Setup:
    """One method's model, loss, transform and step, plus the torchvision resnet whose modules the
    backbone shares (what gets exported)."""

    def __init__(self, method: str, total_steps: int):
        if method not in METHODS:
            raise SystemExit(f"lightly side: unknown method {method!r}; one of {', '.join(METHODS)}")
        self.method, self.total_steps = method, total_steps
        self.resnet = resnet18_small()
        backbone = nn.Sequential(*list(self.resnet.children())[:-1])
        if method == "moco_v2":
            self.model = MoCo(backbone)
            self.criterion = NTXentLoss(temperature=0.1, memory_bank_size=(4096, 128))
            self.transform = MoCoV2Transform(input_size=IMAGE_SIZE, min_scale=0.08, gaussian_blur=0.0, normalize=IMAGENET_NORMALIZE)
        elif method == "simclr":
            self.model = SimCLR(backbone)
            self.criterion = NTXentLoss(temperature=0.5)
            self.transform = SimCLRTransform(input_size=IMAGE_SIZE, cj_strength=0.5, gaussian_blur=0.0, normalize=IMAGENET_NORMALIZE)
        else:
            self.model = BYOL(backbone)
            self.criterion = NegativeCosineSimilarity()
            self.transform = BYOLTransform(
                view_1_transform=BYOLView1Transform(input_size=IMAGE_SIZE, gaussian_blur=0.0),
                view_2_transform=BYOLView2Transform(input_size=IMAGE_SIZE, gaussian_blur=0.0),
            )

    def loss(self, views: list[torch.Tensor], step: int) -> torch.Tensor:
        """The examples' training-loop body up to the loss (momentum update first)."""
        model, criterion = self.model, self.criterion
        if self.method == "moco_v2":
            x_query, x_key = views
            update_momentum(model.backbone, model.backbone_momentum, m=0.99)
            update_momentum(model.projection_head, model.projection_head_momentum, m=0.99)
            return criterion(model(x_query), model.forward_momentum(x_key))
        if self.method == "simclr":
            x0, x1 = views
            return criterion(model(x0), model(x1))
        x0, x1 = views
        # cosine_schedule divides by max_steps - 1: total + 1 gives sslctl's cos(pi k / K) exactly
        tau = cosine_schedule(step, self.total_steps + 1, 0.99, 1.0)
        update_momentum(model.backbone, model.backbone_momentum, m=tau)
        update_momentum(model.projection_head, model.projection_head_momentum, m=tau)
        p0, z0 = model(x0), model.forward_momentum(x0)
        p1, z1 = model(x1), model.forward_momentum(x1)
        return 0.5 * (criterion(p0, z1) + criterion(p1, z0))

    def lr(self, step: int) -> float:
        return cosine_schedule(step, self.total_steps + 1, LR * BATCH / 128, 0.0)


# ---------------------------------------------------------------------------------- data


def _rgb(image):
    """Fashion-MNIST is gray: replicate to RGB before lightly's (RGB) view transform."""
    return image.convert("RGB")


def fashion_mnist(root: Path, idx_dir: Path, transform) -> torchvision.datasets.FashionMNIST:
    """torchvision's FashionMNIST over the idx files (unpacked once into ROOT/FashionMNIST/raw)."""
    raw = root / "FashionMNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    for name in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"):
        if not (raw / name).exists():
            src = idx_dir / f"{name}.gz"
            tmp = raw / f"{name}.tmp"
            with gzip.open(src) as f, open(tmp, "wb") as out:
                shutil.copyfileobj(f, out)
            tmp.rename(raw / name)
    return torchvision.datasets.FashionMNIST(str(root), train=True, transform=torchvision.transforms.Compose([_rgb, transform]))


# ---------------------------------------------------------------------------------- training


def train(args) -> dict:
    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    dataset_probe = 60000 // BATCH  # steps per epoch of Fashion-MNIST train with drop_last
    total = round(args.epochs * dataset_probe)
    setup = Setup(args.method, total)
    model = setup.model.to(device)
    setup.criterion.to(device)  # in place: the loss (and MoCo's memory bank in it) lives on the device
    dataset = fashion_mnist(Path(args.data_root), Path(args.fmnist), setup.transform)
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=BATCH, shuffle=True, drop_last=True, num_workers=args.workers,
        pin_memory=device.type == "cuda",
    )
    assert len(loader) == dataset_probe
    optimizer = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)
    last = min(total, args.steps)
    times, waits, losses = [], [], []
    step = 0
    model.train()
    while step < last:
        it = iter(loader)
        while step < last:
            t0 = time.perf_counter()
            try:
                (views, _labels) = next(it)
            except StopIteration:
                break
            views = [v.to(device, non_blocking=True) for v in views]
            t1 = time.perf_counter()
            for group in optimizer.param_groups:
                group["lr"] = setup.lr(step)
            loss = setup.loss(views, step)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            losses.append(float(loss.detach()))  # one host sync per step, as sslctl's loop
            t2 = time.perf_counter()
            times.append(t2 - t0)
            waits.append(t1 - t0)
            step += 1
            if args.deadline and time.time() >= args.deadline:  # the step in flight finishes, as on SIGTERM
                last = step
    export(setup, Path(args.out) / "encoder.safetensors")
    return {
        "library": "lightly", "method": args.method, "steps": step, "batch": BATCH, "step_times": times,
        "waits": waits, "losses": losses, "threads": torch.get_num_threads(), "workers": args.workers,
        "device": str(device), "seconds_since_start": time.time() - T_START,
    }


def export(setup: Setup, path: Path) -> Path:
    """The online backbone with torchvision keys (the Sequential shares the resnet's modules)."""
    from sslctl.encoder_io import save_encoder

    resnet = setup.resnet
    resnet.fc = nn.Identity()
    resnet.arch, resnet.feature_dim = "resnet18", 512
    return save_encoder(
        path, resnet, small_stem=True, input_size=IMAGE_SIZE, mean=IMAGENET_NORMALIZE["mean"],
        std=IMAGENET_NORMALIZE["std"], recipe=f"lightly-{setup.method}",
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--method", required=True, choices=METHODS)
    ap.add_argument("--out", required=True, help="run directory: result.json, encoder.safetensors")
    ap.add_argument("--fmnist", required=True, help="folder with the Fashion-MNIST idx .gz files")
    ap.add_argument("--data-root", required=True, help="torchvision dataset root (raw files unpacked here)")
    ap.add_argument("--steps", type=int, required=True)
    ap.add_argument("--epochs", type=float, default=1, help="the cosine spans this many epochs (fractions allowed)")
    ap.add_argument("--workers", type=int, required=True)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--deadline", type=float, default=0.0, help="unix time: stop after the step in flight then")
    args = ap.parse_args()
    Path(args.out).mkdir(parents=True, exist_ok=True)
    record = train(args)
    (Path(args.out) / "result.json").write_text(json.dumps(record))
    print(Path(args.out) / "result.json")


if __name__ == "__main__":
    main()
