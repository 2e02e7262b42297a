"""Semantic-dedup search time: FAISS IndexFlatIP vs a numpy brute-force matmul, side by side in one run.

    python bench/bench_dedup.py                       # 100k queries x 20k references, dim 768 (the issue's size)
    python bench/bench_dedup.py --queries 10000       # quicker

Embeddings are precomputed (random, L2-normalised, float32), so this times only the nearest-neighbour search
that ``student_trainer.recipe.dedup`` runs after embedding. Both searches are exact; the script checks that they
agree (scores within 1e-4, same neighbour except float ties) and prints the times and their ratio.
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import numpy as np

from student_trainer.recipe.dedup import l2_normalize, nearest_faiss, nearest_numpy


def _timed(fn, *args):
    start = time.perf_counter()
    out = fn(*args)
    return time.perf_counter() - start, out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--queries", type=int, default=100_000)
    parser.add_argument("--references", type=int, default=20_000)
    parser.add_argument("--dim", type=int, default=768, help="all-mpnet-base-v2 embeds in 768 dimensions")
    parser.add_argument("--chunk", type=int, default=4096, help="numpy baseline: queries per matmul")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    import faiss

    rng = np.random.default_rng(args.seed)
    queries_Q_D = l2_normalize(rng.standard_normal((args.queries, args.dim), dtype=np.float32))
    references_R_D = l2_normalize(rng.standard_normal((args.references, args.dim), dtype=np.float32))
    flops = 2 * args.queries * args.references * args.dim
    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
        f"load average {os.getloadavg()[0]:.2f}; faiss {faiss.__version__} "
        f"({faiss.omp_get_max_threads()} OpenMP threads), numpy {np.__version__}"
    )
    print(
        f"search: {args.queries} queries x {args.references} references, dim {args.dim}, top-1 inner product"
    )

    # warm-up on a slice: thread pools and BLAS initialisation are not part of the search time
    nearest_faiss(queries_Q_D[:256], references_R_D)
    nearest_numpy(queries_Q_D[:256], references_R_D, args.chunk)

    t_faiss, (scores_f, idx_f) = _timed(nearest_faiss, queries_Q_D, references_R_D)
    t_numpy, (scores_n, idx_n) = _timed(nearest_numpy, queries_Q_D, references_R_D, args.chunk)

    max_diff = float(np.abs(scores_f - scores_n).max())
    same = float((idx_f == idx_n).mean())
    assert max_diff < 1e-4, f"FAISS and numpy disagree on scores by {max_diff}"
    print(f"agreement: max |score diff| {max_diff:.2e}, same neighbour for {same:.4%} of queries")
    print(f"{'method':<28} {'seconds':>8} {'queries/s':>10} {'GFLOP/s':>8}")
    for name, t in (("faiss IndexFlatIP", t_faiss), (f"numpy matmul (chunk {args.chunk})", t_numpy)):
        print(f"{name:<28} {t:>8.2f} {args.queries / t:>10.0f} {flops / t / 1e9:>8.1f}")
    print(f"ratio numpy / faiss: {t_numpy / t_faiss:.2f}x")


if __name__ == "__main__":
    main()
