"""`sslctl plot`: pictures of an embedding or of a training run (matplotlib, Agg: no display).

    embedding_map(FEATS, out)   a 2-D map of one split's features (PCA, t-SNE or UMAP of the
                                L2-normalised features, the geometry kNN uses), coloured by class
    training_curves(RUN, out)   loss, learning rate and kNN-monitor top-1 from RUN/metrics.jsonl
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from sslctl import console
from sslctl.artifacts import atomic_path
from sslctl.errors import UserError

METHODS = ("pca", "tsne", "umap")


def pca_2d(x: torch.Tensor) -> torch.Tensor:
    """Projection on the two leading principal axes (eigenvectors of the covariance), with a
    sign fixed so that the same data always gives the same picture."""
    x = x.double() - x.double().mean(dim=0)
    _, vectors = torch.linalg.eigh(x.T @ x)
    axes = vectors[:, -2:].flip(1)  # eigh sorts ascending: the last two are the largest
    axes = axes * torch.sign(axes[axes.abs().argmax(dim=0), torch.arange(2)])  # largest entry positive
    return (x @ axes).float()


def reduce_2d(x: torch.Tensor, method: str, seed: int = 0) -> torch.Tensor:
    if method == "pca":
        return pca_2d(x)
    if method == "tsne":
        try:
            from sklearn.manifold import TSNE
        except ImportError:
            raise UserError("--method tsne needs scikit-learn: pip install 'sslctl[plot]' (or scikit-learn)") from None
        perplexity = min(30.0, (len(x) - 1) / 3)
        return torch.from_numpy(TSNE(2, perplexity=perplexity, init="pca", random_state=seed).fit_transform(x.numpy()))
    if method == "umap":
        try:
            import umap
        except ImportError:
            raise UserError("--method umap needs umap-learn: pip install 'sslctl[plot]' (or umap-learn)") from None
        return torch.from_numpy(umap.UMAP(n_components=2, random_state=seed, n_jobs=1).fit_transform(x.numpy()))
    raise UserError(f"--method {method}: expected one of {', '.join(METHODS)}")


def embedding_map(
    features: str | Path, out: str | Path, *, method: str = "pca", split: str | None = None, max_points: int = 5000,
    seed: int = 0,
) -> Path:
    """Scatter of `split`'s features (None: test, else val, else the first split) in 2-D,
    coloured by label, legend with the class names. At most max_points rows (a seeded random
    subset) are drawn."""
    from sslctl.embed import load_split, read_features_metadata
    from sslctl.evaluate.splits import default_eval_split

    if method not in METHODS:
        raise UserError(f"--method {method}: expected one of {', '.join(METHODS)}")
    meta = read_features_metadata(features)
    split = split or default_eval_split(meta["splits"] or []) or (meta["splits"] or ["train"])[0]
    x, y = load_split(features, split, need_labels=False)
    console.log(f"plot: split {split}, {min(len(x), max_points)} of its {len(x)} points")
    if len(x) > max_points:
        keep = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))[:max_points].sort().values
        x, y = x[keep], y[keep]
    if len(x) < 3:
        raise UserError(f"{features}: split {split!r} has {len(x)} rows; a map needs at least 3")
    xy = reduce_2d(torch.nn.functional.normalize(x, dim=1), method, seed)

    plt = _pyplot()
    classes = meta.get("classes") or []
    fig, ax = plt.subplots(figsize=(8, 7), dpi=120)
    labels = sorted(set(y.tolist()))
    cmap = plt.get_cmap("tab10" if len(labels) <= 10 else "tab20" if len(labels) <= 20 else "turbo")
    size = min(16.0, max(2.0, 8000 / len(x)))  # points stay visible when few, distinct when many
    for i, c in enumerate(labels):
        rows = y == c
        name = "unlabelled" if c < 0 else (classes[c] if c < len(classes) else str(c))
        color = "0.5" if c < 0 else cmap(i if len(labels) <= 20 else i / max(1, len(labels) - 1))
        ax.scatter(xy[rows, 0], xy[rows, 1], s=size, alpha=0.7, color=color, label=name, linewidths=0)
    if len(labels) <= 20:
        ax.legend(markerscale=4, fontsize=8, loc="center left", bbox_to_anchor=(1.0, 0.5), frameon=False)
    encoder = meta.get("encoder") or {}
    what = f"{encoder.get('arch', '?')}{' (random init)' if encoder.get('weights') == 'random' else ''}, {meta['layer']}"
    ax.set_title(f"{method.upper() if method != 'tsne' else 't-SNE'} of {split} features: {what}\n{Path(features).name}, {len(x)} points", fontsize=10)
    ax.set_xticks([])
    ax.set_yticks([])
    return _save(fig, out)


def read_metrics(run: str | Path) -> list[dict]:
    """The JSON lines of RUN/metrics.jsonl (or of that file); a line cut short by a kill ends it."""
    path = Path(run)
    file = path / "metrics.jsonl" if path.is_dir() else path
    if not file.is_file():
        raise UserError(f"{file}: no metrics.jsonl here; pass a run directory written by `sslctl pretrain`")
    records = []
    for line in file.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            break
    if not any("loss" in r for r in records):
        raise UserError(f"{file}: no training steps logged yet (no line with a 'loss')")
    return records


def training_curves(run: str | Path, out: str | Path) -> Path:
    """Loss and lr per step; kNN-monitor top-1 per monitored step when the run has a monitor."""
    records = read_metrics(run)
    steps = [r for r in records if "loss" in r]
    monitor = [r for r in records if any(k.startswith("knn_top1_k") for k in r)]
    knn_k = {k: int(m[1]) for r in monitor for k in r if (m := re.fullmatch(r"knn_top1_k(\d+)", k))}

    plt = _pyplot()
    panels = 3 if monitor else 2
    fig, axes = plt.subplots(1, panels, figsize=(5 * panels, 4), dpi=120)
    x = [r["step"] for r in steps]
    axes[0].plot(x, [r["loss"] for r in steps], lw=1)
    axes[0].set(title="training loss", xlabel="step", ylabel="loss")
    axes[1].plot(x, [r.get("lr") for r in steps], lw=1, color="tab:orange")
    axes[1].set(title="learning rate", xlabel="step", ylabel="lr")
    if monitor:
        for key, k in sorted(knn_k.items(), key=lambda item: item[1]):
            pts = [(r["step"], r[key]) for r in monitor if key in r]
            axes[2].plot([p[0] for p in pts], [p[1] for p in pts], marker="o", ms=3, label=f"k={k}")
        split = monitor[-1].get("monitor", "")
        axes[2].set(title=f"kNN monitor top-1 ({split})", xlabel="step", ylabel="top-1 %")
        axes[2].legend(fontsize=8)
    for ax in axes:
        ax.grid(alpha=0.3)
    run_name = Path(run).resolve().name if Path(run).is_dir() else Path(run).resolve().parent.name
    fig.suptitle(f"{run_name}: {len(steps)} logged steps, last loss {steps[-1]['loss']:.4f}", fontsize=10)
    return _save(fig, out)


def plot(path: str | Path, out: str | Path, **map_options) -> Path:
    """A run directory or metrics.jsonl -> curves; a features file -> embedding map."""
    p = Path(path)
    if p.is_dir() or p.name.endswith(".jsonl"):
        return training_curves(p, out)
    return embedding_map(p, out, **map_options)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # no display needed: batch jobs, SSH sessions
    import matplotlib.pyplot as plt

    return plt


def _save(fig, out: str | Path) -> Path:
    out = Path(out)
    if out.suffix.lower() not in (".png", ".pdf", ".svg"):
        raise UserError(f"--out {out}: expected a .png, .pdf or .svg file")
    fig.tight_layout()
    with atomic_path(out) as tmp:
        fig.savefig(tmp, format=out.suffix[1:].lower(), bbox_inches="tight")
    _pyplot().close(fig)
    return out

