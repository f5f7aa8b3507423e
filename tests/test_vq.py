import math

import pytest
import torch

from vqseg.modules.qpm import QPM
from vqseg.modules.vq import VectorQuantizer


def make_vq(dim: int = 16, codebook_size: int = 300, chunk_size: int = 50, seed: int = 0) -> VectorQuantizer:
    torch.manual_seed(seed)
    return VectorQuantizer(dim, codebook_size, chunk_size=chunk_size)


def tokens_of(z: torch.Tensor) -> torch.Tensor:
    return z.permute(0, 2, 3, 1).reshape(-1, z.shape[1])


def test_nearest_code_matches_brute_force_float64() -> None:
    vq = make_vq().double()
    z = torch.randn(2, 16, 7, 9, dtype=torch.float64) * 0.3  # 126 tokens, chunks of 50
    out = vq(z)
    brute = torch.cdist(tokens_of(z), vq.codebook).argmin(dim=1)
    assert out.indices.shape == (2, 7, 9) and out.indices.dtype == torch.long
    assert torch.equal(out.indices.flatten(), brute)


def test_nearest_code_float32_is_a_true_minimiser() -> None:
    vq = make_vq(codebook_size=1024, chunk_size=100)
    z = torch.randn(3, 16, 10, 10) * 0.3
    out = vq(z)
    dist = torch.cdist(tokens_of(z).double(), vq.codebook.double()).pow(2)
    chosen = dist.gather(1, out.indices.view(-1, 1)).squeeze(1)
    torch.testing.assert_close(chosen, dist.min(dim=1).values, rtol=0, atol=1e-5)


def test_straight_through_and_codebook_gradients() -> None:
    vq = make_vq()
    z = torch.randn(2, 16, 4, 5, requires_grad=True)
    out = vq(z)
    codes = vq.codebook.detach()[out.indices].permute(0, 3, 1, 2)
    torch.testing.assert_close(out.quantized, codes)
    upstream = torch.randn_like(z)
    out.quantized.backward(upstream, retain_graph=True)
    assert torch.equal(z.grad, upstream)
    assert vq.mapping.weight.grad is None  # the codebook learns only through its loss

    expected_loss = (1 + vq.beta) * (tokens_of(z) - tokens_of(codes)).pow(2).mean()
    torch.testing.assert_close(out.loss, expected_loss)
    z.grad = None
    out.loss.backward()
    assert vq.mapping.weight.grad.abs().sum() > 0
    torch.testing.assert_close(z.grad, 2 * vq.beta * (z - codes) / z.numel())
    assert vq.frozen_codebook.grad is None and not vq.frozen_codebook.requires_grad


def test_perturb_hook_changes_quantized_only() -> None:
    vq = make_vq()
    z = torch.randn(2, 16, 4, 5, requires_grad=True)
    clean = vq(z)
    shifted = vq(z, perturb=lambda indices, codebook: (indices + 1) % codebook.shape[0])
    assert torch.equal(shifted.indices, clean.indices)
    assert torch.equal(clean.used_indices, clean.indices)
    assert torch.equal(shifted.used_indices, (clean.indices + 1) % vq.codebook_size)
    torch.testing.assert_close(shifted.loss, clean.loss)
    codes = vq.codebook.detach()[(clean.indices + 1) % vq.codebook_size].permute(0, 3, 1, 2)
    torch.testing.assert_close(shifted.quantized, codes)
    upstream = torch.randn_like(z)
    shifted.quantized.backward(upstream)
    assert torch.equal(z.grad, upstream)

    jumped = vq(z, perturb=QPM(eps=1.0, generator=torch.Generator().manual_seed(0)))
    assert not torch.allclose(jumped.quantized, clean.quantized)


def hand_made_vq() -> VectorQuantizer:
    vq = VectorQuantizer(dim=2, codebook_size=4)
    vq.frozen_codebook.copy_(torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]))
    with torch.no_grad():
        vq.mapping.weight.copy_(torch.eye(2))
    return vq


def image_of(code_ids: list[int]) -> torch.Tensor:
    """One 1 x 2 x 1 x N image whose tokens sit near the given codes."""
    codes = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])[code_ids] + 0.1
    return codes.T.reshape(1, 2, 1, len(code_ids))


def test_usage_statistics_on_hand_made_case() -> None:
    vq = hand_made_vq()
    out = vq(image_of([0, 0, 1, 1]))
    assert out.indices.flatten().tolist() == [0, 0, 1, 1]
    torch.testing.assert_close(out.perplexity, torch.tensor(2.0))
    assert vq.usage() == pytest.approx({"fraction_used": 0.5, "perplexity": 2.0})

    vq(image_of([2, 2, 2, 2]))  # running histogram now 2, 2, 4, 0
    entropy = -(2 * 0.25 * math.log(0.25) + 0.5 * math.log(0.5))
    assert vq.usage() == pytest.approx({"fraction_used": 0.75, "perplexity": math.exp(entropy)})

    vq.eval()
    torch.testing.assert_close(vq(image_of([3, 3, 3, 3])).perplexity, torch.tensor(1.0))
    assert vq.usage()["fraction_used"] == pytest.approx(0.75)  # eval passes are not counted
    vq.reset_usage()
    assert vq.usage() == pytest.approx({"fraction_used": 0.0, "perplexity": 1.0})


def test_state_dict_holds_the_frozen_table_and_loading_uses_the_saved_one() -> None:
    """The table is saved (float32, as drawn): a checkpoint keeps its codes even where this torch
    build would draw another table from the seed; code usage is not saved."""
    vq = VectorQuantizer(dim=8, codebook_size=32, table_seed=3)
    different = VectorQuantizer(dim=8, codebook_size=32, table_seed=4)
    assert not torch.equal(vq.frozen_codebook, different.frozen_codebook)
    state = vq.state_dict()
    assert set(state) == {"frozen_codebook", "mapping.weight"}
    assert state["frozen_codebook"].dtype == torch.float32 and torch.equal(state["frozen_codebook"], vq.frozen_codebook)
    different.load_state_dict(state)
    assert torch.equal(different.frozen_codebook, vq.frozen_codebook)
    torch.testing.assert_close(different.codebook, vq.codebook)
    assert not different.frozen_codebook.requires_grad
    assert [name for name, p in vq.named_parameters() if p.requires_grad] == ["mapping.weight"]


def test_a_state_without_the_table_regenerates_it_from_the_seed_and_says_so(monkeypatch, capsys) -> None:
    """Checkpoints written before the table was saved still load strictly, with one note."""
    import vqseg.modules.foundation as foundation

    monkeypatch.setattr(foundation, "_NOTED", set())
    vq = VectorQuantizer(dim=8, codebook_size=32, table_seed=3)
    old = {"mapping.weight": vq.mapping.weight.detach().clone()}
    fresh = VectorQuantizer(dim=8, codebook_size=32, table_seed=3)
    with torch.no_grad():
        fresh.frozen_codebook.zero_()
    fresh.load_state_dict(old, strict=True)
    assert torch.equal(fresh.frozen_codebook, vq.frozen_codebook)
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "older checkpoint" in err and "regenerated from seed 3" in err
    fresh.load_state_dict(old)  # a teacher loaded next to its student: no second note
    assert capsys.readouterr().err == ""
    fresh.load_state_dict(vq.state_dict())  # a current checkpoint: no note at all
    assert capsys.readouterr().err == ""


def test_autocast_keeps_float32_distances() -> None:
    vq = make_vq(codebook_size=512)
    z = torch.randn(2, 16, 6, 6) * 0.3
    reference = vq(z).indices
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = vq(z)
        out_half = vq(z.bfloat16())
    assert torch.equal(out.indices, reference) and out.quantized.dtype == torch.float32
    assert torch.equal(out_half.indices, vq(z.bfloat16().float()).indices)
    assert out_half.quantized.dtype == torch.bfloat16 and out.loss.dtype == torch.float32


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_forward_has_no_host_sync_on_cuda() -> None:
    vq = make_vq(dim=64, codebook_size=4096).cuda()
    z = torch.randn(4, 64, 16, 16, device="cuda", requires_grad=True)
    qpm = QPM(eps=0.7, generator=torch.Generator(device="cuda").manual_seed(0))
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        vq(z, perturb=qpm)
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_centering_spreads_features_that_share_one_direction() -> None:
    """Frozen-encoder features with a dominant common direction all pick the same code unless the
    quantizer standardises them first (``method.vq_center``); the norm is then in the model, with
    running statistics for evaluation."""
    from vqseg.models.vq_net import FactorizedQuantizer

    torch.manual_seed(0)
    common = torch.randn(1, 64, 1, 1) * 5
    z = common + torch.randn(8, 64, 6, 6) * 0.5
    used = {}
    for center in (False, True):
        quantizer = FactorizedQuantizer(64, 0, 512, 0.25, cosine=True, center=center).train()
        used[center] = quantizer(z).indices.unique().numel()
    assert used[False] <= 3 and used[True] > 50
    norm = FactorizedQuantizer(64, 32, 512, 0.25, cosine=True, center=True).center
    assert isinstance(norm, torch.nn.BatchNorm2d) and not norm.affine
