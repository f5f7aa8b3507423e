"""How local QPM's jumps are, before and after the nearest-neighbour scaling of the distances.

Issue 13 measured the jump law on a freshly initialised VQ-Seg codebook (K = 16384, 32-wide,
L2-normalised codes): with p(j|i) ~ exp(-||c_i - c_j||^2 / T) and T = 1 the jumps were close to a
uniform swap. This script recomputes, for a sample of source codes, the exact jump law of
  before: exp(-d_ij / T), T = 1 (the paper's law, the old default)
  after:  exp(-d_ij / (s_i T)), s_i = the source's nearest-neighbour distance, for several T
and reports the effective support exp(entropy), the jump mass on the 1 / 10 / 100 / 1 % nearest
codes, and what `jump_stats` logs for sampled jumps. Usage:
  python benchmarks/qpm_locality.py [--sources 256]   (writes benchmarks/logs/qpm_locality_cpu.log)
"""

from __future__ import annotations

import argparse
import datetime
from pathlib import Path

import torch
from torch import Tensor

from vqseg.modules.qpm import jump_logits, jump_stats, perturb_indices
from vqseg.modules.vq import VectorQuantizer

LOG = Path(__file__).resolve().parent / "logs" / "qpm_locality_cpu.log"
CODEBOOK_SIZE, CODE_DIM = 16384, 32
TEMPERATURES = [0.03, 0.05, 0.1, 0.2, 0.3, 0.5, 1.0]
TOP = [1, 10, 100, round(0.01 * (CODEBOOK_SIZE - 1))]


def law_summary(logits: Tensor, sq_dist: Tensor) -> dict[str, float]:
    """Mean over source rows of the effective support and of the mass on each source's nearest codes."""
    probs = logits.softmax(dim=1)
    entropy = -torch.special.xlogy(probs, probs).sum(dim=1)
    order = sq_dist.argsort(dim=1)
    cumulative = probs.gather(1, order).cumsum(dim=1)
    summary = {"support": entropy.exp().mean().item()}
    summary.update({f"top{k}": cumulative[:, k - 1].mean().item() for k in TOP})
    return summary


def sampled(codebook: Tensor, sources: Tensor, temperature: float) -> dict[str, float]:
    draws = sources.repeat(16)
    jumped = perturb_indices(draws, codebook, 1.0, temperature, torch.Generator().manual_seed(0))
    return jump_stats(draws, jumped, codebook, max_tokens=draws.numel())


def sampled_old(codebook: Tensor, sources: Tensor) -> dict[str, float]:
    """Sampled jumps under the old law, drawn with torch.multinomial from its exact probabilities."""
    draws = sources.repeat(16)
    sq_dist = torch.cdist(codebook[draws], codebook).pow(2).scatter_(1, draws[:, None], float("inf"))
    jumped = torch.multinomial((-sq_dist).softmax(dim=1), 1, generator=torch.Generator().manual_seed(0)).squeeze(1)
    return jump_stats(draws, jumped, codebook, max_tokens=draws.numel())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sources", type=int, default=256, help="source codes sampled evenly from the codebook")
    args = parser.parse_args()
    torch.manual_seed(0)  # the learnable map's initialisation, as in a run with seed 0
    codebook = VectorQuantizer(CODE_DIM, CODEBOOK_SIZE, cosine=True).codebook.detach()
    sources = torch.linspace(0, CODEBOOK_SIZE - 1, args.sources).long()
    sq_norms = codebook.pow(2).sum(dim=1)
    sq_dist = torch.cdist(codebook[sources], codebook).pow(2).scatter_(1, sources[:, None], float("inf"))
    nn_dist = sq_dist.amin(dim=1)

    rows = [("before: exp(-d/T), T=1", law_summary(-sq_dist, sq_dist), sampled_old(codebook, sources))]
    for t in TEMPERATURES:
        law = law_summary(jump_logits(codebook, sq_norms, sources, t), sq_dist)
        rows.append((f"after: exp(-d/(s T)), T={t:g}", law, sampled(codebook, sources, t)))

    lines = [
        f"# QPM locality, {datetime.datetime.now().isoformat(timespec='seconds')}, torch {torch.__version__}",
        f"# codebook at initialisation: K={CODEBOOK_SIZE}, code_dim={CODE_DIM}, cosine; {args.sources} source codes",
        f"# squared distances: nearest neighbour median {nn_dist.median():.3f} (range {nn_dist.min():.3f}-"
        f"{nn_dist.max():.3f}), all pairs median {sq_dist[sq_dist.isfinite()].median():.3f}",
        f"# exact law: effective support exp(H) of {CODEBOOK_SIZE - 1} codes, jump mass on the k nearest codes "
        f"(k={TOP[-1]} is the 1 %); sampled: 16 jumps per source, share into the 1 % nearest, median rank",
        "",
        "| law | support | " + " | ".join(f"mass top{k}" for k in TOP) + " | sampled near 1 % | sampled median rank |",
        "|---|---|" + "---|" * len(TOP) + "---|---|",
    ]
    for name, law, stats in rows:
        masses = " | ".join(f"{100 * law[f'top{k}']:.2f} %" for k in TOP)
        lines.append(f"| {name} | {law['support']:.0f} | {masses} | {100 * stats['near_share']:.1f} % | "
                     f"{stats['rank_median']:.0f} |")
    report = "\n".join(lines) + "\n"
    print(report)
    LOG.parent.mkdir(parents=True, exist_ok=True)
    LOG.write_text(report)


if __name__ == "__main__":
    main()
