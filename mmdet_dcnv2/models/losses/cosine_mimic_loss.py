"""The feature-mimicking loss of DCNv2 (paper, Sec. 3.3, eq. 3): 1 - cos(f_RCNN, f_FRCNN) per RoI."""

from typing import Optional

import torch.nn.functional as F
from mmdet.models.losses.utils import weight_reduce_loss
from mmdet.registry import MODELS
from torch import Tensor, nn

REDUCTIONS = ("none", "mean", "sum")


def cosine_mimic_loss(pred: Tensor, target: Tensor) -> Tensor:
    """Per-row ``1 - cos(pred, target)`` for (n, d) features, computed in float32.

    float32 because the two features may come from bfloat16 autocast, where the dot product of two
    1024-D vectors would lose most of the digits that separate a cosine of 0.99 from 1.
    """
    if pred.shape != target.shape or pred.dim() != 2:
        raise ValueError(
            f"pred and target must be (n, d) features of one shape, got {tuple(pred.shape)} and {tuple(target.shape)}"
        )
    return 1 - F.cosine_similarity(pred.float(), target.float(), dim=1)


@MODELS.register_module()
class CosineMimicLoss(nn.Module):
    """``loss_weight * reduce(1 - cos(f_RCNN(b), f_FRCNN(b)))`` over RoIs b.

    Reductions: ``'mean'`` divides the sum over RoIs by ``avg_factor`` when one is given (the mimic
    head passes the number of images, which is eq. 3 -- a sum over each image's sampled RoIs --
    averaged over the batch) and by the number of RoIs otherwise; ``'sum'`` is the plain sum (any
    ``avg_factor`` ignored); ``'none'`` returns the per-RoI values.
    """

    def __init__(self, reduction: str = "mean", loss_weight: float = 1.0) -> None:
        super().__init__()
        if reduction not in REDUCTIONS:
            raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
        self.reduction = reduction
        self.loss_weight = loss_weight

    def forward(
        self,
        pred: Tensor,
        target: Tensor,
        weight: Optional[Tensor] = None,
        avg_factor: Optional[float] = None,
        reduction_override: Optional[str] = None,
    ) -> Tensor:
        reduction = reduction_override or self.reduction
        if reduction not in REDUCTIONS:
            raise ValueError(f"reduction_override must be one of {REDUCTIONS}, got {reduction!r}")
        loss = cosine_mimic_loss(pred, target)
        if weight is not None:
            weight = weight.float()
        # mmdet's weight_reduce_loss refuses an avg_factor with 'sum'; here it just has no effect.
        avg_factor = avg_factor if reduction == "mean" else None
        return self.loss_weight * weight_reduce_loss(loss, weight, reduction, avg_factor)
