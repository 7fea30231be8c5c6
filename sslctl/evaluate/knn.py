"""Weighted kNN classification of frozen features (docs/spec/protocols.md E1).

L2-normalise bank and queries; take each query's top-k bank neighbours by cosine similarity;
weight each neighbour by exp(sim / T); a class scores the sum of its neighbours' weights; the
prediction is the arg-max (top-5: the five best class scores, among classes that got a vote). One search at the largest k
serves every (k, T) pair, because the first k of the top-K neighbours are the top-k.

Search backends (both exact):
    faiss   IndexFlatIP (on the GPU when faiss has GPU support and CUDA is present)
    torch   chunked matmul + topk on the features' device (the brute-force reference; the
            default for CUDA features when faiss has no GPU support)
A bf16 candidate search with an exact fp32 re-rank was measured and lost on this CPU (see
docs/evaluate.md and bench/bench_knn.py, where it lives on as a measured alternative).
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from sslctl.errors import UserError

DEFAULT_PAIRS: tuple[tuple[int, float], ...] = ((20, 0.07), (200, 0.1))
BACKENDS = ("auto", "faiss", "torch")

Searcher = Callable[[torch.Tensor, int], tuple[torch.Tensor, torch.Tensor]]


def protocol(k: int, temperature: float, backend: str = "exact") -> str:
    """The protocol string written next to every number (approximate search is labelled)."""
    suffix = "" if backend == "exact" else f"/{backend}"
    return f"weighted-knn/cosine/k={k}/T={temperature:g}{suffix}"


def pair_up(ks: Sequence[int], temperatures: Sequence[float]) -> list[tuple[int, float]]:
    """(k, T) pairs: equal-length lists pair up in order; a single value applies to all."""
    ks, temperatures = list(ks), list(temperatures)
    if len(ks) == 1 and len(temperatures) > 1:
        ks = ks * len(temperatures)
    if len(temperatures) == 1 and len(ks) > 1:
        temperatures = temperatures * len(ks)
    if len(ks) != len(temperatures) or not ks:
        raise UserError(
            f"--k given {len(ks)} times and --temperature {len(temperatures)} times: give them the same "
            "number of times (they pair up in order) or give one of them once (it applies to all)"
        )
    for k, t in zip(ks, temperatures):
        if k < 1 or not t > 0:
            raise UserError(f"k={k}, T={t}: k must be >= 1 and T > 0")
    return [(int(k), float(t)) for k, t in zip(ks, temperatures)]


def weighted_knn(
    bank: torch.Tensor,
    bank_labels: torch.Tensor,
    queries: torch.Tensor,
    query_labels: torch.Tensor,
    ks: Sequence[int] = (20, 200),
    temperatures: Sequence[float] = (0.07, 0.1),
    *,
    num_classes: int | None = None,
    backend: str = "auto",
    chunk_size: int | None = None,
) -> list[dict]:
    """Weighted kNN accuracy of `queries` against `bank` for each (k, T) pair (see `pair_up`).

    bank: N x D, queries: M x D (any float dtype, any device; normalised here), labels int.
    Returns one dict per pair: k, temperature, protocol, top1, top5 (percent), per_class_top1
    (percent, one per class; NaN for a class with no query), n_bank, n_eval.
    """
    pairs = pair_up(ks, temperatures)
    n_bank = bank.shape[0]
    if bank.ndim != 2 or queries.ndim != 2 or bank.shape[1] != queries.shape[1]:
        raise UserError(f"bank {tuple(bank.shape)} and queries {tuple(queries.shape)} must be N x D and M x D with the same D")
    if bank_labels.shape != (n_bank,) or query_labels.shape != (queries.shape[0],):
        raise UserError("labels must hold one class per row of the bank / queries")
    k_max = max(k for k, _ in pairs)
    if k_max > n_bank:
        raise UserError(f"k={k_max} is larger than the bank ({n_bank} rows); ask for a smaller --k")
    if num_classes is None:
        num_classes = int(max(bank_labels.max(), query_labels.max())) + 1

    bank = F.normalize(bank.float(), dim=1)
    search, used = make_searcher(bank, backend)
    bank_labels = bank_labels.to(bank.device, torch.int64)
    query_labels = query_labels.to(torch.int64)
    chunk = chunk_size or max(1, min(4096, (1 << 26) // max(1, n_bank)))  # ~256 MB of fp32 scores

    top1 = torch.zeros(len(pairs), num_classes, dtype=torch.int64)
    top5 = torch.zeros(len(pairs), dtype=torch.int64)
    per_class_n = torch.bincount(query_labels.cpu(), minlength=num_classes)
    for start in range(0, queries.shape[0], chunk):
        q = F.normalize(queries[start : start + chunk].to(bank.device).float(), dim=1)
        y = query_labels[start : start + chunk].to(bank.device)
        sims, idx = search(q, k_max)
        sims, idx = sims.to(bank.device), idx.to(bank.device)
        for p, (k, t) in enumerate(pairs):
            scores = class_scores(sims[:, :k], bank_labels[idx[:, :k]], num_classes, t)
            best = scores.topk(min(5, num_classes), dim=1)
            # a class no neighbour voted for is never a prediction, even when there are < 5 others
            hits = (best.indices == y[:, None]) & (best.values > 0)
            top1[p] += torch.bincount(y[hits[:, 0]], minlength=num_classes).cpu()
            top5[p] += hits.any(dim=1).sum().cpu()

    n_eval = queries.shape[0]
    results = []
    for p, (k, t) in enumerate(pairs):
        per_class = (100.0 * top1[p].double() / per_class_n.double()).tolist()  # 0/0 -> NaN
        results.append(
            {
                "k": k,
                "temperature": t,
                "protocol": protocol(k, t),
                "top1": 100.0 * int(top1[p].sum()) / n_eval,
                "top5": 100.0 * int(top5[p]) / n_eval,
                "per_class_top1": [None if math.isnan(v) else v for v in per_class],
                "n_bank": n_bank,
                "n_eval": n_eval,
                "backend": used,
            }
        )
    return results


def class_scores(sims: torch.Tensor, neighbour_labels: torch.Tensor, num_classes: int, temperature: float) -> torch.Tensor:
    """M x k similarities and labels of the neighbours -> M x C summed weights exp(sim / T)."""
    weights = (sims.float() / temperature).exp()
    scores = torch.zeros(sims.shape[0], num_classes, device=sims.device)
    return scores.scatter_add_(1, neighbour_labels, weights)


# --- search backends: searcher(q, k) -> (sims M x k descending, indices M x k) for unit rows ---


def make_searcher(bank: torch.Tensor, backend: str = "auto") -> tuple[Searcher, str]:
    """A search function over the L2-normalised bank, and the name of the backend it uses."""
    if backend not in BACKENDS:
        raise UserError(f"unknown kNN backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if backend == "auto":
        backend = "torch" if bank.is_cuda and not _faiss_gpu() else "faiss"
    if backend == "faiss":
        return _faiss_searcher(bank), "faiss-gpu" if bank.is_cuda and _faiss_gpu() else "faiss"
    return _torch_searcher(bank), "torch"


def _faiss_gpu() -> bool:
    try:
        import faiss
    except ImportError:  # a GPU image without faiss: the exact torch search runs on the GPU instead
        return False
    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0 and torch.cuda.is_available()


def _faiss_searcher(bank: torch.Tensor) -> Searcher:
    import faiss

    index = faiss.IndexFlatIP(bank.shape[1])
    if bank.is_cuda and _faiss_gpu():
        resources = faiss.StandardGpuResources()
        index = faiss.index_cpu_to_gpu(resources, bank.device.index or 0, index)
        index.resources = resources  # keep the GPU memory pool alive as long as the index
    index.add(np.ascontiguousarray(bank.cpu().numpy()))

    def search(q: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        sims, idx = index.search(np.ascontiguousarray(q.cpu().numpy()), k)
        return torch.from_numpy(sims), torch.from_numpy(idx)

    return search


def _torch_searcher(bank: torch.Tensor) -> Searcher:
    def search(q: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        with _exact_fp32_matmul():
            return (q @ bank.T).topk(k, dim=1)

    return search


class _exact_fp32_matmul:
    """Exact fp32 similarities on CUDA even when the caller allowed TF32 for training."""

    def __enter__(self):
        self.saved = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = False

    def __exit__(self, *exc):
        torch.backends.cuda.matmul.allow_tf32 = self.saved


def knn_monitor(bank: torch.Tensor, bank_labels: torch.Tensor, queries: torch.Tensor, query_labels: torch.Tensor,
                *, split: str) -> tuple[dict, str]:
    """The training's online monitor (`sslctl pretrain --monitor SPLIT`, train.Engine's `monitor`):
    E1's two (k, T) defaults, each k capped by a small bank. Returns the metrics.jsonl entries
    (knn_top1_kK) and a log line."""
    ks = [min(k, len(bank)) for k, _ in DEFAULT_PAIRS]
    results = weighted_knn(bank, bank_labels, queries, query_labels, ks=ks, temperatures=[t for _, t in DEFAULT_PAIRS])
    record = {f"knn_top1_k{r['k']}": r["top1"] for r in results}
    return record, f"kNN top-1 on {split} " + ", ".join(f"{r['top1']:.2f}% ({r['protocol']})" for r in results)
