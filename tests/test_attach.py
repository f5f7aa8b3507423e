"""attach: UAFS insertion by name, feature taps (plain and wrapped models), weighted PDCR total."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch import nn

from vqseg.modules.attach import FeatureTap, PDCRConfig, PDCRLayer, insert_uafs, pdcr_total_loss
from vqseg.modules.pdcr import cross_layer_pdcr_loss, pdcr_loss
from vqseg.modules.uafs import UAFS


class TinyNet(nn.Module):
    """A nested backbone: stem -> encoder (Sequential) -> head, all at 16 x 24 resolution."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.encoder = nn.Sequential(nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.ReLU(), nn.Conv2d(16, 8, 1))
        self.head = nn.Conv2d(8, 3, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.encoder(self.stem(x))
        return self.head(nn.functional.interpolate(features, size=x.shape[-2:]))


@pytest.fixture
def net() -> TinyNet:
    torch.manual_seed(0)
    return TinyNet()


def test_insert_uafs_infers_channels_and_changes_the_output(net: TinyNet) -> None:
    x = torch.randn(2, 3, 16, 24)
    before = net(x)
    running_mean = net.stem[1].running_mean.clone()
    insert_uafs(net, ["stem", "encoder.0"], example_input=x)
    assert torch.equal(net.stem[0][1].running_mean, running_mean)
    assert isinstance(net.stem, nn.Sequential) and isinstance(net.stem[1], UAFS)
    assert net.stem[1].attention[0].in_channels == 8
    assert isinstance(net.encoder[0][1], UAFS) and net.encoder[0][1].attention[0].in_channels == 16
    after = net(x)
    assert after.shape == before.shape
    assert not torch.allclose(after, before)
    assert net.training


def test_insert_uafs_wraps_parent_and_child(net: TinyNet) -> None:
    insert_uafs(net, ["encoder", "encoder.2"], channels={"encoder": 8, "encoder.2": 8}, m=3, kernel_size=5)
    assert isinstance(net.encoder[1], UAFS)
    assert isinstance(net.encoder[0][2][1], UAFS)
    assert net.encoder[1].attention[-1].out_channels == 3
    assert net(torch.randn(1, 3, 16, 24)).shape == (1, 3, 16, 24)


def test_insert_uafs_errors(net: TinyNet) -> None:
    with pytest.raises(ValueError, match=r"no submodule named 'decoder'.*encoder\.0"):
        insert_uafs(net, ["decoder"], example_input=torch.randn(1, 3, 16, 24))
    with pytest.raises(ValueError, match="example_input"):
        insert_uafs(net, ["stem"])


def test_feature_tap_captures_outputs_and_removes_hooks(net: TinyNet) -> None:
    x = torch.randn(2, 3, 16, 24)
    with FeatureTap(net, ["stem", "encoder.1"]) as tap:
        net(x)
        stem = net.stem(x)
        torch.testing.assert_close(tap["stem"], stem)
        torch.testing.assert_close(tap["encoder.1"], net.encoder[1](net.encoder[0](stem)))
        assert tap["stem"].requires_grad
        with pytest.raises(ValueError, match="available"):
            tap["nowhere"]
    assert not tap.features
    assert not net.stem._forward_hooks and not net.encoder[1]._forward_hooks
    net(x)
    assert not tap.features


def test_on_demand_tap_records_only_the_captured_pass(net: TinyNet) -> None:
    """The pass inside capture() is the one kept, whatever runs before or after it."""
    first, chosen, later = torch.randn(3, 2, 3, 16, 24).unbind()
    tap = FeatureTap(net, ["stem"], on_demand=True)
    net(first)
    assert not tap.features
    with tap.capture():
        net(chosen)
    net(later)  # a second pass with gradients, after the chosen one
    torch.testing.assert_close(tap["stem"], net.stem(chosen))
    with tap.capture():
        net(later)
        with pytest.raises(RuntimeError, match="twice"):
            net(chosen)
    with pytest.raises(RuntimeError, match="on_demand"):
        with FeatureTap(net, ["stem"]).capture():
            pass


def test_feature_tap_accepts_wrapper_prefix(net: TinyNet) -> None:
    wrapped = nn.DataParallel(net)
    tap = FeatureTap(wrapped, ["stem", "module.encoder.2"])
    wrapped(torch.randn(1, 3, 16, 24))
    assert tap["module.stem"] is tap["stem"]
    assert tap["encoder.2"].shape == (1, 8, 8, 12)
    tap.remove()
    assert not net.stem._forward_hooks


def test_feature_tap_under_distributed_data_parallel(net: TinyNet, tmp_path: Path) -> None:
    if not dist.is_available():
        pytest.skip("torch.distributed unavailable")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    try:
        model = nn.parallel.DistributedDataParallel(net)
        with FeatureTap(model, ["encoder.2"]) as tap:
            model(torch.randn(2, 3, 16, 24))
            assert tap["module.encoder.2"].shape == (2, 8, 8, 12)
    finally:
        dist.destroy_process_group()


def test_pdcr_total_loss_weights_each_term(net: TinyNet) -> None:
    x = torch.randn(2, 3, 16, 24)
    labels = torch.zeros(2, 16, 24, dtype=torch.long)
    labels[:, 4:12, 6:18] = 1
    labels[:, 10:, 18:] = 2
    cfg = PDCRConfig(
        layers=[PDCRLayer("stem", 32, 0.1), PDCRLayer("encoder.2", 8, 0.01)],
        cross_layer=("stem", "encoder.2"),
        cross_weight=0.01,
    )
    with FeatureTap(net, cfg.tapped_names()) as tap:
        net(x)
        total, parts = pdcr_total_loss(tap, labels, 3, cfg)
        expected = (
            0.1 * pdcr_loss(tap["stem"], labels, 3, num_samples=32)
            + 0.01 * pdcr_loss(tap["encoder.2"], labels, 3, num_samples=8)
            + 0.01 * cross_layer_pdcr_loss(tap["stem"], tap["encoder.2"], labels, 3, num_samples=32)
        )
    torch.testing.assert_close(total, expected)
    assert set(parts) == {"pdcr/stem", "pdcr/encoder.2", "pdcr/cross/stem~encoder.2", "pdcr/total"}
    assert all(not value.requires_grad for value in parts.values())
    total.backward()
    assert net.stem[0].weight.grad.abs().sum() > 0 and net.encoder[2].weight.grad.abs().sum() > 0
    assert net.head.weight.grad is None


def test_pdcr_config_needs_a_term() -> None:
    with pytest.raises(ValueError):
        PDCRConfig(layers=[])


def test_pdcr_config_defaults_are_the_official_2d_ones() -> None:
    cfg = PDCRConfig(layers=[PDCRLayer("stem", 64, 0.1)])
    assert (cfg.patch_sizes, cfg.tau, cfg.sampling, cfg.cross_layer) == ((5, 7, 9), 1.0, "grid", None)
    assert (cfg.cross_weight, cfg.cross_num_samples, cfg.boundary_boost) == (0.01, 32, 3.0)
    both = PDCRConfig(layers=[PDCRLayer("stem", 8, 0.1), PDCRLayer("head", 8, 0.1)], cross_layer=("encoder.2", "stem"))
    assert both.tapped_names() == ["stem", "head", "encoder.2"]


def test_pdcr_total_loss_passes_every_setting_to_each_term(net: TinyNet) -> None:
    """Each layer term gets its own sample count and the shared settings (patch sizes, tau,
    sampling, ignore label, boundary boost, generator, in order); the cross term contrasts
    cross_layer[0] against the projected cross_layer[1] at cross_num_samples locations."""
    x = torch.randn(2, 3, 16, 24)
    labels = torch.zeros(2, 16, 24, dtype=torch.long)
    labels[:, 4:12, 6:18] = 1
    labels[:, 10:, 18:] = 2
    labels[0, :5] = 255
    cfg = PDCRConfig(
        layers=[PDCRLayer("stem", 12, 0.3), PDCRLayer("encoder.2", 6, 0.05)],
        patch_sizes=(3, 5),
        tau=0.4,
        sampling="balanced",
        cross_layer=("stem", "encoder.0"),
        cross_weight=0.2,
        cross_num_samples=10,
        boundary_boost=1.0,
    )
    proj = nn.Linear(16, 8)
    with FeatureTap(net, cfg.tapped_names()) as tap:
        net(x)
        total, parts = pdcr_total_loss(tap, labels, 3, cfg, 255, torch.Generator().manual_seed(0), cross_proj=proj)
        g = torch.Generator().manual_seed(0)
        shared = dict(patch_sizes=(3, 5), tau=0.4, sampling="balanced", ignore_index=255, boundary_boost=1.0)
        stem = pdcr_loss(tap["stem"], labels, 3, num_samples=12, generator=g, **shared)
        deep = pdcr_loss(tap["encoder.2"], labels, 3, num_samples=6, generator=g, **shared)
        cross = cross_layer_pdcr_loss(
            tap["stem"], tap["encoder.0"], labels, 3, num_samples=10, generator=g, proj=proj, **shared
        )
    torch.testing.assert_close(parts["pdcr/stem"], stem.detach())
    torch.testing.assert_close(parts["pdcr/encoder.2"], deep.detach())
    torch.testing.assert_close(parts["pdcr/cross/stem~encoder.0"], cross.detach())
    torch.testing.assert_close(total, 0.3 * stem + 0.05 * deep + 0.2 * cross)
    total.backward()
    assert proj.weight.grad is not None and proj.weight.grad.abs().sum() > 0
