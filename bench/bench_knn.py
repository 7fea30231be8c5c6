"""docs/spec/protocols.md B3: the cost of exact k-nearest-neighbour search for weighted kNN.

    python bench/bench_knn.py --features FEATS           # 60k x 512 bank / 10k queries (B2 features)
    python bench/bench_knn.py --synthetic                # random unit vectors of the same sizes
    python bench/bench_knn.py --features FEATS --repeats 1 --skip sklearn   # quick look

Each method finds the k = 200 most similar bank rows (cosine) of every query:
    bare matmul    Q @ B.T in fp32, one call, no top-k: the floor of exact search
    faiss          sslctl's default: IndexFlatIP (exact) on L2-normalised rows
    torch chunked  matmul + topk over query chunks (sslctl --backend torch)
    bf16 certified bf16 candidates (2k per query) + exact fp32 re-rank; a query whose exact
                   top-k cannot be proven to lie among its candidates is searched again
                   exactly (measured here, not in sslctl: it lost, see docs/evaluate.md)
    sklearn brute  KNeighborsClassifier(algorithm="brute", metric="cosine").kneighbors
Then the E1 vote (k=200, T=0.1) turns each method's neighbours into predictions, which must
agree with faiss's. Seconds are the median of --repeats; the search runs on all the cores torch,
faiss and the BLAS see (report them). A markdown table goes to stdout.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sslctl.evaluate.knn import class_scores, make_searcher  # noqa: E402


# Largest |bf16 similarity - exact similarity| for unit vectors: rounding both inputs to bf16
# (unit roundoff u = 2^-9) perturbs each product a_i*b_i by at most (2u + u^2)|a_i b_i|, so the
# dot product by at most (2u + u^2)|a||b| <= 2^-8 + 2^-18; rounding the result to bf16 adds at
# most u|s| <= 2^-9; fp32 accumulation and normalisation error stay far below the 1e-4 slack.
BF16_SIM_ERROR = 2**-8 + 2**-18 + 2**-9 + 1e-4


def bf16_searcher(bank: torch.Tensor):
    """search(q, k) with bf16 candidates and an exact re-rank; .stats counts the queries that
    had to be searched again exactly. Neighbours equal the exact ones (the bound above)."""
    bank16, exact = bank.bfloat16(), make_searcher(bank, "torch")[0]
    stats = {"queries": 0, "searched_again": 0}

    def search(q: torch.Tensor, k: int):
        n_cand = min(len(bank), 2 * k)
        approx, cand = (q.bfloat16() @ bank16.T).topk(n_cand, dim=1)
        sims = torch.empty(len(q), n_cand)
        for s in range(0, len(q), 256):  # bounded gather: 256 x n_cand x D
            sims[s : s + 256] = torch.einsum("md,mkd->mk", q[s : s + 256], bank[cand[s : s + 256]])
        sims, order = sims.topk(k, dim=1)
        idx = cand.gather(1, order)
        # A non-candidate scores at most approx[:, -1] in bf16, so at most that + error exactly:
        # if the exact k-th best beats that bound, no non-candidate can belong to the top k.
        unproven = sims[:, -1] <= approx[:, -1].float() + BF16_SIM_ERROR
        if n_cand < len(bank) and unproven.any():
            sims[unproven], idx[unproven] = exact(q[unproven], k)
        stats["queries"] += len(q)
        stats["searched_again"] += int(unproven.sum())
        return sims, idx

    search.stats = stats
    return search


def timed(fn, repeats: int):
    times, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def chunked(search, queries, k, chunk):
    sims, idx = zip(*(search(queries[s : s + chunk], k) for s in range(0, len(queries), chunk)))
    return torch.cat(sims), torch.cat(idx)


def sklearn_search(bank, queries, k):
    from sklearn.neighbors import KNeighborsClassifier

    clf = KNeighborsClassifier(n_neighbors=k, algorithm="brute", metric="cosine").fit(bank.numpy(), np.zeros(len(bank)))
    dist, idx = clf.kneighbors(queries.numpy())
    return torch.from_numpy(1.0 - dist).float(), torch.from_numpy(idx)


def predictions(sims, idx, labels, num_classes, k=200, t=0.1):
    return class_scores(sims[:, :k], labels[idx[:, :k]], num_classes, t).argmax(dim=1)


def load(args):
    if args.synthetic:
        g = torch.Generator().manual_seed(0)
        bank, queries = torch.randn(60000, 512, generator=g), torch.randn(10000, 512, generator=g)
        return bank, torch.randint(0, 10, (60000,), generator=g), queries, torch.randint(0, 10, (10000,), generator=g), "synthetic N(0, 1)"
    from sslctl.embed import load_split

    bank, bank_labels = load_split(args.features, "train")
    queries, query_labels = load_split(args.features, "test")
    return bank, bank_labels, queries, query_labels, str(args.features)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--features", type=Path, help="features file with train (bank) and test (queries) splits")
    src.add_argument("--synthetic", action="store_true", help="random unit vectors, 60k x 512 / 10k x 512")
    parser.add_argument("--k", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip", nargs="*", default=[], help="methods to leave out: sklearn, matmul, torch, bf16")
    args = parser.parse_args()

    bank, bank_labels, queries, query_labels, what = load(args)
    bank, queries = F.normalize(bank.float(), dim=1), F.normalize(queries.float(), dim=1)
    num_classes = int(max(bank_labels.max(), query_labels.max())) + 1
    chunk = max(1, min(4096, (1 << 26) // len(bank)))  # as weighted_knn chunks its queries
    print(f"bank {tuple(bank.shape)}, queries {tuple(queries.shape)}, k={args.k}, {what}", file=sys.stderr)
    print(f"{platform.processor() or platform.machine()}, torch threads {torch.get_num_threads()}, "
          f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}", file=sys.stderr)

    rows = []
    if "matmul" not in args.skip:
        seconds, _ = timed(lambda: queries @ bank.T, args.repeats)
        rows.append(("bare matmul (fp32, no top-k)", seconds, None))

    searchers = {}

    def searcher(name):
        searchers[name] = search = bf16_searcher(bank) if name == "bf16" else make_searcher(bank, name)[0]
        return lambda: chunked(search, queries, args.k, chunk)

    seconds, (ref_sims, ref_idx) = timed(searcher("faiss"), args.repeats)
    reference = predictions(ref_sims, ref_idx, bank_labels, num_classes)
    rows.append(("faiss IndexFlatIP (sslctl default)", seconds, (ref_sims, ref_idx)))
    for name, label in (("torch", "torch chunked matmul + topk"), ("bf16", "bf16 candidates + exact re-rank")):
        if name not in args.skip:
            seconds, found = timed(searcher(name), args.repeats)
            rows.append((label, seconds, found))
    if "sklearn" not in args.skip:
        seconds, found = timed(lambda: sklearn_search(bank, queries, args.k), 1 if args.repeats < 3 else 2)
        rows.append(("scikit-learn brute (cosine)", seconds, found))

    if "bf16" in searchers:
        stats = searchers["bf16"].stats
        print(f"bf16: {100 * stats['searched_again'] / stats['queries']:.1f}% of query searches could not be proven "
              f"from their 2k bf16 candidates and were redone exactly", file=sys.stderr)
    matmul = rows[0][1] if rows[0][2] is None else None
    print(f"\n| method | seconds | x bare matmul | same neighbours as faiss | predictions agree (k={args.k}, T=0.1) |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for label, seconds, found in rows:
        ratio = f"{seconds / matmul:.2f}" if matmul else "-"
        if found is None:
            print(f"| {label} | {seconds:.2f} | {ratio} | - | - |")
            continue
        sims, idx = found
        # Neighbour lists may differ only by the order of exact float ties: compare true sims.
        true = torch.cat([torch.einsum("md,mkd->mk", queries[s : s + 256], bank[idx[s : s + 256]])
                          for s in range(0, len(queries), 256)])
        same = ((true - ref_sims).abs().max(dim=1).values < 1e-5).float().mean().item()
        agree = (predictions(sims, idx, bank_labels, num_classes) == reference).float().mean().item()
        print(f"| {label} | {seconds:.2f} | {ratio} | {100 * same:.2f}% | {100 * agree:.2f}% |")


if __name__ == "__main__":
    main()
