"""lightly's side of bench/compare.py (docs/spec/protocols.md B1/B2): MoCo v2, SimCLR, BYOL,
SimSiam, Barlow Twins, VICReg and DINO written the way lightly's documentation examples write
them (lightly examples/pytorch/moco.py, simclr.py, byol.py, simsiam.py, barlowtwins.py,
vicreg.py, dino.py): a torchvision dataset with lightly's view transform, a plain DataLoader, the model as
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
  SimSiam    SimSiamProjectionHead(512, 2048, 2048) / SimSiamPredictionHead(2048, 512, 2048),
             NegativeCosineSimilarity on detached z (sslctl's small variant's heads; the example's
             are 512 / 128 wide)
  Barlow T.  BarlowTwinsProjectionHead(512, 2048, 2048), BarlowTwinsLoss(lambda 0.0051)
  VICReg     VICRegProjectionHead(512, 2048, 2048, num_layers=3), VICRegLoss() (25, 25, 1)
  DINO       DINOProjectionHead(D, 2048, 256, 4096, freeze_last_layer=1) for student and teacher,
             DINOLoss(4096), m = cosine_schedule(step, .., 0.996, 1); each view through the
             networks apart (the example's lists); `dino`: the ResNet-18 above, `dino_vit`: timm's
             vit_tiny_patch16_224 at 32 px, patch 4, dynamic_img_size (built by sslctl's encoders,
             the same call as sslctl's side)
  views      MoCoV2Transform / SimCLRTransform(cj_strength 0.5) / BYOLTransform (BYOL, Barlow
             Twins) / SimSiamTransform / VICRegTransform(scale 0.2-1, solarize 0.1) at 32 px,
             scale 0.08-1 unless stated, no blur; DINOTransform with 2 x 32 px (0.08-1) + 4 x 16 px
             (0.05-0.4) crops, no blur; Fashion-MNIST's gray replicated to RGB first

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

from lightly.loss import BarlowTwinsLoss, DINOLoss, NegativeCosineSimilarity, NTXentLoss, VICRegLoss  # noqa: E402
from lightly.models.modules import (  # noqa: E402
    BarlowTwinsProjectionHead, BYOLPredictionHead, BYOLProjectionHead, DINOProjectionHead, MoCoProjectionHead,
    SimCLRProjectionHead, SimSiamPredictionHead, SimSiamProjectionHead,
)
from lightly.models.modules.heads import VICRegProjectionHead  # noqa: E402 (lightly 1.6 does not re-export it)
from lightly.models.utils import deactivate_requires_grad, update_momentum  # noqa: E402
from lightly.transforms import (  # noqa: E402
    BYOLTransform, BYOLView1Transform, BYOLView2Transform, DINOTransform, MoCoV2Transform, SimCLRTransform,
    SimSiamTransform, VICRegTransform,
)
from lightly.transforms.utils import IMAGENET_NORMALIZE  # noqa: E402
from lightly.utils.scheduler import cosine_schedule  # noqa: E402

METHODS = ("moco_v2", "simclr", "byol", "simsiam", "barlow_twins", "vicreg", "dino", "dino_vit")
BATCH, LR, MOMENTUM, WEIGHT_DECAY = 128, 0.06, 0.9, 5e-4
IMAGE_SIZE = 32
DINO_PROTOTYPES, DINO_LOCAL_SIZE, DINO_LOCAL_VIEWS = 4096, 16, 4
VIT = ("timm:vit_tiny_patch16_224", {"img_size": IMAGE_SIZE, "patch_size": 4, "dynamic_img_size": True})


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


class SimSiam(nn.Module):
    def __init__(self, backbone: nn.Module):
        super().__init__()
        self.backbone = backbone
        self.projection_head = SimSiamProjectionHead(512, 2048, 2048)
        self.prediction_head = SimSiamPredictionHead(2048, 512, 2048)

    def forward(self, x):
        z = self.projection_head(self.backbone(x).flatten(start_dim=1))
        return z.detach(), self.prediction_head(z)


class Projected(nn.Module):
    """Barlow Twins, VICReg: backbone + one projection head, the loss on its output."""

    def __init__(self, backbone: nn.Module, head: nn.Module):
        super().__init__()
        self.backbone, self.projection_head = backbone, head

    def forward(self, x):
        return self.projection_head(self.backbone(x).flatten(start_dim=1))


class DINO(nn.Module):
    def __init__(self, backbone: nn.Module, dim: int):
        super().__init__()
        self.student_backbone = backbone
        self.student_head = DINOProjectionHead(dim, 2048, 256, DINO_PROTOTYPES, freeze_last_layer=1)
        self.teacher_backbone = copy.deepcopy(backbone)
        self.teacher_head = DINOProjectionHead(dim, 2048, 256, DINO_PROTOTYPES)  # as the example: its own init
        deactivate_requires_grad(self.teacher_backbone)
        deactivate_requires_grad(self.teacher_head)

    def forward(self, x):
        return self.student_head(self.student_backbone(x).flatten(start_dim=1))

    def forward_teacher(self, x):
        return self.teacher_head(self.teacher_backbone(x).flatten(start_dim=1))


class Setup:
    """One method's model, loss, transform and step, plus the torchvision resnet whose modules the
    backbone shares (what gets exported)."""

    def __init__(self, method: str, total_steps: int):
        if method not in METHODS:
            raise SystemExit(f"lightly side: unknown method {method!r}; one of {', '.join(METHODS)}")
        self.method, self.total_steps = method, total_steps
        self.resnet = resnet18_small()
        backbone = nn.Sequential(*list(self.resnet.children())[:-1])
        if method == "dino_vit":
            from sslctl.encoders import build_backbone

            self.resnet = backbone = build_backbone(VIT[0], **VIT[1])  # what gets exported: the ViT itself
        if method in ("dino", "dino_vit"):
            self.model = DINO(backbone, 512 if method == "dino" else backbone.feature_dim)
            self.criterion = DINOLoss(output_dim=DINO_PROTOTYPES)
            self.transform = DINOTransform(
                global_crop_size=IMAGE_SIZE, global_crop_scale=(0.08, 1.0), local_crop_size=DINO_LOCAL_SIZE,
                local_crop_scale=(0.05, 0.4), n_local_views=DINO_LOCAL_VIEWS, gaussian_blur=(0.0, 0.0, 0.0),
                normalize=IMAGENET_NORMALIZE,
            )
        elif method == "moco_v2":
            self.model = MoCo(backbone)
            self.criterion = NTXentLoss(temperature=0.1, memory_bank_size=(4096, 128))
            self.transform = MoCoV2Transform(input_size=IMAGE_SIZE, min_scale=0.08, gaussian_blur=0.0, normalize=IMAGENET_NORMALIZE)
        elif method == "simclr":
            self.model = SimCLR(backbone)
            self.criterion = NTXentLoss(temperature=0.5)
            self.transform = SimCLRTransform(input_size=IMAGE_SIZE, cj_strength=0.5, gaussian_blur=0.0, normalize=IMAGENET_NORMALIZE)
        elif method == "simsiam":
            self.model = SimSiam(backbone)
            self.criterion = NegativeCosineSimilarity()
            self.transform = SimSiamTransform(input_size=IMAGE_SIZE, min_scale=0.08, gaussian_blur=0.0)
        elif method == "vicreg":
            self.model = Projected(backbone, VICRegProjectionHead(512, 2048, 2048, num_layers=3))
            self.criterion = VICRegLoss()
            self.transform = VICRegTransform(input_size=IMAGE_SIZE, min_scale=0.2, solarize_prob=0.1, gaussian_blur=0.0)
        else:  # BYOL, Barlow Twins: BYOL's asymmetric views
            if method == "byol":
                self.model = BYOL(backbone)
                self.criterion = NegativeCosineSimilarity()
            else:
                self.model = Projected(backbone, BarlowTwinsProjectionHead(512, 2048, 2048))
                self.criterion = BarlowTwinsLoss(lambda_param=0.0051)
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
        if self.method in ("simclr", "barlow_twins", "vicreg"):
            x0, x1 = views
            return criterion(model(x0), model(x1))
        if self.method == "simsiam":
            (z0, p0), (z1, p1) = model(views[0]), model(views[1])
            return 0.5 * (criterion(z0, p1) + criterion(z1, p0))
        if self.method in ("dino", "dino_vit"):
            m = cosine_schedule(step, self.total_steps + 1, 0.996, 1.0)
            update_momentum(model.student_backbone, model.teacher_backbone, m=m)
            update_momentum(model.student_head, model.teacher_head, m=m)
            teacher_out = [model.forward_teacher(view) for view in views[:2]]
            student_out = [model(view) for view in views]
            return criterion(teacher_out, student_out, epoch=0)
        x0, x1 = views
        # cosine_schedule divides by max_steps - 1: total + 1 gives sslctl's cos(pi k / K) exactly
        tau = cosine_schedule(step, self.total_steps + 1, 0.99, 1.0)
        update_momentum(model.backbone, model.backbone_momentum, m=tau)
        update_momentum(model.projection_head, model.projection_head_momentum, m=tau)
        p0, z0 = model(x0), model.forward_momentum(x0)
        p1, z1 = model(x1), model.forward_momentum(x1)
        return 0.5 * (criterion(p0, z1) + criterion(p1, z0))

    def after_backward(self) -> None:
        """The example's step between backward and optimizer.step (DINO: the frozen last layer)."""
        if self.method in ("dino", "dino_vit"):
            self.model.student_head.cancel_last_layer_gradients(current_epoch=0)

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


def image_folder(root: Path) -> torchvision.datasets.ImageFolder:
    """Class folders of RGB images (CIFAR-10's JPEG train split); the transform is set later."""
    return torchvision.datasets.ImageFolder(str(root))


def train(args) -> dict:
    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    folder = image_folder(Path(args.image_folder)) if args.image_folder else None
    dataset_probe = (len(folder) if folder else 60000) // BATCH  # steps per epoch with drop_last
    total = round(args.epochs * dataset_probe)
    setup = Setup(args.method, total)
    model = setup.model.to(device)
    setup.criterion.to(device)  # in place: the loss (and MoCo's memory bank in it) lives on the device
    if folder:
        folder.transform = setup.transform
        dataset = folder
    else:
        dataset = fashion_mnist(Path(args.data_root), Path(args.fmnist), setup.transform)
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=BATCH, shuffle=True, drop_last=True, num_workers=args.workers,
        pin_memory=device.type == "cuda",
    )
    assert len(loader) == dataset_probe
    optimizer = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)
    last = min(total, args.steps)
    times, waits, losses = [], [], []
    snapshot_at = sorted(float(t) for t in args.snapshot_at.split(",") if t.strip())
    snapshots = []  # {"step", "seconds", "path"}: the backbone at the first step end past each time
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
            setup.after_backward()
            optimizer.step()
            optimizer.zero_grad()
            losses.append(float(loss.detach()))  # one host sync per step, as sslctl's loop
            t2 = time.perf_counter()
            times.append(t2 - t0)
            waits.append(t1 - t0)
            step += 1
            if snapshot_at and time.time() - T_START >= snapshot_at[0]:
                seconds = time.time() - T_START
                path = export(setup, Path(args.out) / "snapshots" / f"encoder-step{step}.safetensors")
                snapshots.append({"step": step, "seconds": seconds, "path": str(path)})
                while snapshot_at and seconds >= snapshot_at[0]:
                    snapshot_at.pop(0)
            if args.deadline and time.time() >= args.deadline:  # the step in flight finishes, as on SIGTERM
                last = step
    export(setup, Path(args.out) / "encoder.safetensors")
    return {
        "library": "lightly", "method": args.method, "steps": step, "batch": BATCH, "step_times": times,
        "waits": waits, "losses": losses, "threads": torch.get_num_threads(), "workers": args.workers,
        "device": str(device), "seconds_since_start": time.time() - T_START, "snapshots": snapshots,
    }


def export(setup: Setup, path: Path) -> Path:
    """The online backbone with torchvision keys (the Sequential shares the resnet's modules)."""
    from sslctl.encoder_io import save_encoder

    resnet = setup.resnet
    path.parent.mkdir(parents=True, exist_ok=True)
    if setup.method != "dino_vit":
        resnet.fc = nn.Identity()
        resnet.arch, resnet.feature_dim = "resnet18", 512
    return save_encoder(
        path, resnet, small_stem=setup.method != "dino_vit", input_size=IMAGE_SIZE, mean=IMAGENET_NORMALIZE["mean"],
        std=IMAGENET_NORMALIZE["std"], recipe=f"lightly-{setup.method}",
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--method", required=True, choices=METHODS)
    ap.add_argument("--out", required=True, help="run directory: result.json, encoder.safetensors")
    data = ap.add_mutually_exclusive_group(required=True)
    data.add_argument("--fmnist", help="folder with the Fashion-MNIST idx .gz files")
    data.add_argument("--image-folder", help="class folders of images (CIFAR-10's train/), read by ImageFolder")
    ap.add_argument("--data-root", help="torchvision dataset root for --fmnist (raw files unpacked here)")
    ap.add_argument("--steps", type=int, required=True)
    ap.add_argument("--epochs", type=float, default=1, help="the cosine spans this many epochs (fractions allowed)")
    ap.add_argument("--workers", type=int, required=True)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--deadline", type=float, default=0.0, help="unix time: stop after the step in flight then")
    ap.add_argument("--snapshot-at", default="", help="seconds since launch, comma list: export the backbone to "
                                                        "OUT/snapshots/ at the first step end past each")
    args = ap.parse_args()
    Path(args.out).mkdir(parents=True, exist_ok=True)
    record = train(args)
    (Path(args.out) / "result.json").write_text(json.dumps(record))
    print(Path(args.out) / "result.json")


if __name__ == "__main__":
    main()
