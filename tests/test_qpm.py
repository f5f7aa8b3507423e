import math

import pytest
import torch
from scipy.stats import chisquare

from vqseg.modules.qpm import QPM, jump_stats, neighbour_ranks, perturb_indices, shuffle_indices

# six codes whose squared distances to code 0 are 0.25, 1, 2.25, 1.0625, 4: a non-trivial jump law
CODES = torch.tensor([[0.0, 0.0], [0.5, 0.0], [1.0, 0.0], [0.0, 1.5], [0.25, 1.0], [2.0, 0.0]])


def expected_law(codebook: torch.Tensor, source: int, eps: float, temperature: float) -> torch.Tensor:
    """p(j|i) ~ exp(-d_ij / (s_i T)), s_i the source's nearest-neighbour squared distance, j != i."""
    sq_dist = (codebook.double() - codebook[source].double()).pow(2).sum(dim=1)
    sq_dist[source] = float("inf")
    weights = torch.exp(-sq_dist / (sq_dist.min() * temperature))
    law = eps * weights / weights.sum()
    law[source] = 1.0 - eps
    return law


def transition_counts(
    source: int, eps: float, temperature: float, draws: int = 200_000, seed: int = 0, codebook: torch.Tensor = CODES
) -> torch.Tensor:
    indices = torch.full((draws,), source)
    gen = torch.Generator().manual_seed(seed)
    out = perturb_indices(indices, codebook, eps, temperature, generator=gen, chunk_size=8192)
    return torch.bincount(out, minlength=len(codebook)).double()


@pytest.mark.parametrize(
    "source,eps,temperature", [(0, 0.7, 1.0), (5, 0.3, 1.0), (0, 1.0, 0.3), (0, 1.0, 3.0), (3, 1.0, 0.2)]
)
def test_transition_frequencies_match_law(source: int, eps: float, temperature: float) -> None:
    counts = transition_counts(source, eps, temperature)
    expected = expected_law(CODES, source, eps, temperature) * counts.sum()
    assert counts[expected == 0].sum() == 0
    # pool the cells too rare for the chi-square approximation (a sum of zero cells stays out)
    rare = expected < 5
    observed = torch.cat([counts[~rare], counts[rare].sum(dim=0, keepdim=True)])
    expected = torch.cat([expected[~rare], expected[rare].sum(dim=0, keepdim=True)])
    observed, expected = observed[expected > 0], expected[expected > 0]
    assert chisquare(observed.numpy(), expected.numpy()).pvalue > 1e-3
    keep_rate = counts[source].item() / counts.sum().item()
    assert abs(keep_rate - (1 - eps)) <= 5 * math.sqrt(eps * (1 - eps) / counts.sum().item()) + 1e-12


def test_temperature_sharpens_and_flattens() -> None:
    cold, hot = transition_counts(0, 1.0, 0.3), transition_counts(0, 1.0, 3.0)
    nearest, farthest = 1, 5
    assert cold[nearest] > hot[nearest] and cold[farthest] < hot[farthest]
    assert not torch.allclose(expected_law(CODES, 0, 1.0, 0.3), expected_law(CODES, 0, 1.0, 3.0))


def test_law_is_invariant_to_the_code_scale() -> None:
    # the nearest-neighbour scaling makes T mean the same for codes 1e-3 or 1e3 times as far apart
    for scale in (1e-3, 1e3):
        torch.testing.assert_close(expected_law(CODES * scale, 0, 1.0, 0.3), expected_law(CODES, 0, 1.0, 0.3))
        counts = transition_counts(0, 1.0, 0.3, draws=50_000, codebook=CODES * scale)
        assert chisquare(counts[1:].numpy(), (expected_law(CODES, 0, 1.0, 0.3)[1:] * 50_000).numpy()).pvalue > 1e-3


def test_cold_law_is_numerically_safe_and_picks_the_nearest() -> None:
    # d / (s T) ~ 1e3 underflows exp() without the max shift; the jump must then be the nearest code
    codebook = CODES * 100
    sq_dist = torch.cdist(codebook, codebook).pow(2).fill_diagonal_(float("inf"))
    two_nearest = sq_dist.topk(2, dim=1, largest=False)
    unique_nearest = torch.arange(len(CODES))[two_nearest.values[:, 1] > 1.05 * two_nearest.values[:, 0]]
    assert len(unique_nearest) >= 4
    indices = unique_nearest.repeat(100)
    out = perturb_indices(indices, codebook, eps=1.0, temperature=1e-3, generator=torch.Generator().manual_seed(0))
    assert torch.equal(out, two_nearest.indices[indices, 0])


def test_duplicate_codes_jump_to_their_twin_without_nans() -> None:
    codebook = torch.cat([CODES, CODES[2:3]])  # code 6 duplicates code 2: nearest-neighbour distance 0
    out = perturb_indices(torch.tensor([2, 6] * 50), codebook, eps=1.0, generator=torch.Generator().manual_seed(0))
    assert torch.equal(out, torch.tensor([6, 2] * 50))


def test_neighbour_ranks_on_a_hand_computed_example() -> None:
    # from code 0: code 1 at 0.25, code 2 at 1, code 4 at 1.0625, code 3 at 2.25, code 5 at 4
    ranks = neighbour_ranks(torch.zeros(5, dtype=torch.long), torch.tensor([1, 2, 3, 4, 5]), CODES)
    assert ranks.tolist() == [1, 2, 4, 3, 5]
    assert neighbour_ranks(torch.tensor([5]), torch.tensor([2]), CODES).tolist() == [1]


def random_unit_codebook(size: int = 2001, dim: int = 16) -> torch.Tensor:
    codes = torch.randn(size, dim, generator=torch.Generator().manual_seed(0))
    return torch.nn.functional.normalize(codes, dim=1)


def sampled_jump_stats(temperature: float, eps: float = 1.0) -> dict[str, float]:
    codebook = random_unit_codebook()
    source = torch.randint(len(codebook), (4000,), generator=torch.Generator().manual_seed(1))
    out = perturb_indices(source, codebook, eps, temperature, generator=torch.Generator().manual_seed(2))
    return jump_stats(source, out, codebook, max_tokens=4000)


def test_low_temperature_lands_near() -> None:
    stats = sampled_jump_stats(0.05)
    assert stats["moved"] == 1.0
    assert stats["near_share"] > 0.9 and stats["rank_median"] <= 3


def test_high_temperature_tends_to_a_uniform_swap() -> None:
    stats = sampled_jump_stats(100.0)
    # 1 % nearest = 20 of 2000 codes; a uniform swap lands there 1 % of the time (+- 0.16 % s.d.)
    assert 0.005 < stats["near_share"] < 0.016
    assert 850 < stats["rank_median"] < 1150


def test_jump_stats_ranks_only_the_moved_tokens() -> None:
    codebook = random_unit_codebook()
    source = torch.arange(100)
    nearest = torch.cdist(codebook[:30], codebook).fill_diagonal_(float("inf")).argmin(dim=1)
    moved = torch.cat([nearest, source[30:]])  # 30 tokens jump to their nearest code, 70 stay
    stats = jump_stats(source, moved, codebook, max_tokens=7)
    assert stats == {"moved": pytest.approx(0.3), "near_share": 1.0, "rank_mean": 1.0, "rank_median": 1.0}
    assert jump_stats(source, source, codebook) == {"moved": 0.0}


@pytest.mark.parametrize("shape", [(), (7,), (2, 3, 4), (3, 0, 2), (2, 5, 5, 2)])
@pytest.mark.parametrize("dtype", [torch.int64, torch.int32])
def test_shape_dtype_device_preserved(shape: tuple[int, ...], dtype: torch.dtype) -> None:
    indices = torch.randint(len(CODES), shape, dtype=dtype)
    for out in (perturb_indices(indices, CODES, eps=0.5), shuffle_indices(indices.reshape(1, -1), eps=0.5)):
        assert out.dtype == dtype and out.device == indices.device
    assert perturb_indices(indices, CODES, eps=0.5).shape == indices.shape
    if indices.dim() > 0:
        assert shuffle_indices(indices, eps=0.5).shape == indices.shape


def test_generator_reproducible_and_chunk_size_invariant() -> None:
    codebook = torch.randn(300, 16)
    indices = torch.randint(300, (4, 9, 11))

    def run(seed: int, chunk_size: int = 1024) -> torch.Tensor:
        gen = torch.Generator().manual_seed(seed)
        return perturb_indices(indices, codebook, 0.7, generator=gen, chunk_size=chunk_size)

    assert torch.equal(run(0), run(0))
    assert torch.equal(run(0), run(0, chunk_size=37))
    assert not torch.equal(run(0), run(1))
    shuffled = [shuffle_indices(indices, 0.7, torch.Generator().manual_seed(s)) for s in (0, 0, 1)]
    assert torch.equal(shuffled[0], shuffled[1]) and not torch.equal(shuffled[0], shuffled[2])


def test_shuffle_preserves_multiset_and_moves_eps_fraction() -> None:
    batch, tokens, eps = 8, 4096, 0.4
    indices = torch.stack([torch.randperm(tokens) for _ in range(batch)]).view(batch, 64, 64)
    out = shuffle_indices(indices, eps, torch.Generator().manual_seed(0))
    assert torch.equal(out.flatten(1).sort(dim=1).values, indices.flatten(1).sort(dim=1).values)
    # a uniform permutation of ~eps * tokens picked tokens has about one fixed point
    moved = (out != indices).double().mean().item()
    assert abs(moved - eps) < 0.02
    assert torch.equal(shuffle_indices(indices, 0.0), indices)


def test_shuffle_permutation_is_uniform() -> None:
    draws = 60_000
    indices = torch.arange(3).repeat(draws, 1)
    out = shuffle_indices(indices, 1.0, torch.Generator().manual_seed(0))
    perm_code = out[:, 0] * 9 + out[:, 1] * 3 + out[:, 2]
    counts = torch.bincount(perm_code, minlength=27)
    observed = counts[counts > 0]
    assert len(observed) == 6
    assert chisquare(observed.numpy()).pvalue > 1e-3


def test_qpm_hook_modes() -> None:
    indices = torch.randint(len(CODES), (2, 8, 8))
    jumped = QPM(eps=1.0)(indices, CODES)
    assert (jumped != indices).all()
    shuffled = QPM(eps=1.0, mode="shuffle")(indices, CODES)
    assert torch.equal(shuffled.flatten(1).sort(dim=1).values, indices.flatten(1).sort(dim=1).values)
    with pytest.raises(ValueError):
        QPM(mode="drop")(indices, CODES)  # type: ignore[arg-type]


def test_invalid_arguments() -> None:
    indices = torch.zeros(3, dtype=torch.long)
    with pytest.raises(ValueError):
        perturb_indices(indices, CODES, eps=1.5)
    with pytest.raises(ValueError):
        perturb_indices(indices, CODES, eps=0.5, temperature=0.0)
    with pytest.raises(ValueError):
        perturb_indices(indices, CODES[:1], eps=0.5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_no_host_sync_on_cuda() -> None:
    codebook = torch.randn(4096, 64, device="cuda")
    indices = torch.randint(4096, (4, 16, 16), device="cuda")
    gen = torch.Generator(device="cuda").manual_seed(0)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        perturb_indices(indices, codebook, 0.7, generator=gen, chunk_size=256)
        shuffle_indices(indices, 0.7, generator=gen)
    finally:
        torch.cuda.set_sync_debug_mode("default")
