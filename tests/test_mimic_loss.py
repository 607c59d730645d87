"""The mimicking loss (eq. 3) on hand-computed cases, and which RoIs are mimicked (fg / bg / all)."""

import math

import pytest
import torch

pytest.importorskip("mmdet")

from mmdet.models.task_modules.assigners import AssignResult  # noqa: E402
from mmdet.models.task_modules.samplers import SamplingResult  # noqa: E402
from mmdet.registry import MODELS  # noqa: E402
from mmdet.utils import register_all_modules  # noqa: E402

from mmdet_dcnv2.models.losses import CosineMimicLoss  # noqa: E402
from mmdet_dcnv2.models.roi_heads import select_mimic_rois  # noqa: E402

# Three RoIs whose cosines are 0, 1/sqrt(2) and 1: per-RoI losses 1, 1 - 1/sqrt(2), 0.
PRED = torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, 2.0]], dtype=torch.float64)
TARGET = torch.tensor([[0.0, 3.0], [5.0, 0.0], [0.0, 0.5]], dtype=torch.float64)
PER_ROI = [1.0, 1.0 - 1.0 / math.sqrt(2.0), 0.0]


def test_per_roi_loss_is_one_minus_cosine():
    loss = CosineMimicLoss(reduction="none")(PRED, TARGET)
    assert loss.dtype == torch.float32  # computed in float32 whatever comes in
    torch.testing.assert_close(loss, torch.tensor(PER_ROI), rtol=0, atol=1e-6)


@pytest.mark.parametrize(
    "reduction, avg_factor, expected",
    [
        ("mean", 2, sum(PER_ROI) / 2),  # the head: a sum per image, averaged over 2 images
        ("mean", None, sum(PER_ROI) / 3),  # no avg_factor: the mean over RoIs
        ("sum", None, sum(PER_ROI)),
        ("sum", 2, sum(PER_ROI)),  # 'sum' ignores avg_factor instead of raising as mmdet's helper would
    ],
)
def test_reduction_and_weight(reduction, avg_factor, expected):
    loss = CosineMimicLoss(reduction=reduction, loss_weight=0.1)(PRED, TARGET, avg_factor=avg_factor)
    assert loss.item() == pytest.approx(0.1 * expected, rel=1e-6)


def test_reduction_override_and_per_roi_weights():
    loss = CosineMimicLoss(loss_weight=2.0)(
        PRED, TARGET, weight=torch.tensor([0.0, 1.0, 1.0]), reduction_override="sum"
    )
    assert loss.item() == pytest.approx(2.0 * PER_ROI[1], rel=1e-6)


def test_built_from_the_registry_with_the_papers_weight():
    register_all_modules(init_default_scope=False)
    loss = MODELS.build(dict(type="CosineMimicLoss", loss_weight=0.1))
    assert isinstance(loss, CosineMimicLoss) and loss.loss_weight == 0.1 and loss.reduction == "mean"


def test_gradient_flows_to_both_features_and_stays_finite_for_a_zero_feature():
    pred = torch.tensor([[0.0, 0.0], [1.0, 2.0]], requires_grad=True)  # a ReLU can zero a whole feature
    target = torch.tensor([[1.0, 1.0], [2.0, -1.0]], requires_grad=True)
    loss = CosineMimicLoss()(pred, target)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(pred.grad).all() and torch.isfinite(target.grad).all()
    assert pred.grad[1].abs().sum() > 0 and target.grad[1].abs().sum() > 0


def test_bad_input_is_named():
    with pytest.raises(ValueError, match="reduction must be one of"):
        CosineMimicLoss(reduction="avg")
    with pytest.raises(ValueError, match="reduction_override must be one of"):
        CosineMimicLoss()(PRED, TARGET, reduction_override="avg")
    with pytest.raises(ValueError, match=r"pred and target must be \(n, d\) features of one shape"):
        CosineMimicLoss()(PRED, TARGET[:, :1])


def _sampling_result(num_pos, num_neg, labels):
    """The sampler's result for one image: priors 0..num_pos-1 positive (matched to gts in turn)."""
    num = num_pos + num_neg
    priors = torch.arange(num, dtype=torch.float32)[:, None].repeat(1, 4) + torch.tensor([0.0, 0.0, 10.0, 10.0])
    gt_inds = torch.cat([torch.arange(num_pos) % len(labels) + 1, torch.zeros(num_neg, dtype=torch.long)])
    assigned = torch.cat([torch.tensor(labels)[torch.arange(num_pos) % len(labels)], torch.full((num_neg,), -1)])
    assign = AssignResult(len(labels), gt_inds, torch.ones(num), assigned)
    return SamplingResult(
        torch.arange(num_pos),
        torch.arange(num_pos, num),
        priors,
        priors[: len(labels)],
        assign,
        torch.zeros(num, dtype=torch.uint8),
    )


RESULTS = [(3, 5, [4, 7]), (0, 4, [2]), (6, 1, [1])]  # (positives, negatives, gt labels) per image
NUM_CLASSES = 9


@pytest.mark.parametrize("mimic_on", ["fg", "bg", "all"])
@pytest.mark.parametrize("num_rois", [2, 32])
def test_selection(mimic_on, num_rois):
    torch.manual_seed(0)
    results = [_sampling_result(*r) for r in RESULTS]
    indices, labels = select_mimic_rois(results, num_rois, mimic_on, NUM_CLASSES)
    starts = [0, 8, 12]
    expected_labels = []
    for image, ((num_pos, num_neg, gt_labels), start) in enumerate(zip(RESULTS, starts)):
        pool = {"fg": range(num_pos), "bg": range(num_pos, num_pos + num_neg), "all": range(num_pos + num_neg)}[
            mimic_on
        ]
        mine = [i - start for i in indices.tolist() if start <= i < start + num_pos + num_neg]
        assert len(mine) == min(num_rois, len(pool)), image  # fewer candidates than num_rois: all of them
        assert set(mine) <= set(pool) and len(set(mine)) == len(mine)
        expected_labels += [gt_labels[i % len(gt_labels)] if i < num_pos else NUM_CLASSES for i in mine]
    assert labels.tolist() == expected_labels
    assert indices.dtype == labels.dtype == torch.long


def test_selection_is_random_but_seeded():
    results = [_sampling_result(20, 0, [1])]
    picks = []
    for seed in (0, 0, 1):
        torch.manual_seed(seed)
        picks.append(select_mimic_rois(results, 5, "fg", NUM_CLASSES)[0].tolist())
    assert picks[0] == picks[1] and picks[0] != picks[2]


def test_selection_with_no_candidates_is_empty():
    indices, labels = select_mimic_rois([_sampling_result(0, 3, [1])], 32, "fg", NUM_CLASSES)
    assert indices.numel() == 0 and labels.numel() == 0
