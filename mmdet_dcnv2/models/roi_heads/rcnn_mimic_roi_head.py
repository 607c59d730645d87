"""R-CNN feature mimicking (DCNv2 paper, Sec. 3.3, Fig. 3): a StandardRoIHead that, in training, also
makes the Fast R-CNN features of a few RoIs imitate those an R-CNN computes from the RoIs' crops.

Per image, up to ``num_rois`` of the bbox sampler's RoIs (positives only by default, the paper's best
setting) are cut out of the normalised input batch and resized to ``crop_size`` squared in one
batched RoIAlign. The crops run through the detector's own backbone and neck (the same weights), the
whole patch is pooled by the detector's own bbox RoI extractor (so by (M)DPool when the config uses
it; a 224-pixel patch lands on P4 of an FPN, a 14x14 map) and through the bbox head's shared fcs:
that is f_RCNN. f_FRCNN is the shared-fc feature of the same RoIs in the Fast R-CNN branch. Two
losses are added to the bbox head's:

- ``loss_mimic`` (eq. 3): the sum over an image's sampled RoIs of 1 - cos(f_RCNN, f_FRCNN), averaged
  over the images of the batch; the gradient reaches the backbone through both branches.
- ``loss_rcnn_cls``: cross-entropy of an unshared (C+1)-way linear classifier (``rcnn_cls``, the only
  parameters this head adds) on f_RCNN against the RoIs' labels (background = C).

Both weigh 0.1 by default, as in the paper. The head never sees the images in mmdet's RoI-head API,
so the detector hands them over for the duration of ``loss`` (``MimicFasterRCNN``,
``MimicMaskRCNN``). Inference is StandardRoIHead's, untouched: a model trained with mimicking runs,
and loads, as the stock detector (``rcnn_cls.*`` is the only key left over).
"""

from contextlib import contextmanager
from typing import Callable, Dict, List, Optional, Tuple

import torch
from mmdet.models.roi_heads import StandardRoIHead
from mmdet.models.roi_heads.bbox_heads import ConvFCBBoxHead
from mmdet.models.task_modules.samplers import SamplingResult
from mmdet.registry import MODELS
from mmdet.structures.bbox import bbox2roi
from mmdet.utils import ConfigType
from torch import Tensor, nn

from mmdet_dcnv2.ops import deform_roi_pool

MIMIC_ON = ("fg", "bg", "all")
# Crops narrower than this are widened about their centre: a zero-width RoI has no area to resample.
MIN_CROP_SIDE = 1.0
# Patches pooled per RoI-layer call. RoI layers cast the RoIs to the features' dtype, and bfloat16
# holds integers exactly only up to 256: under autocast a larger batch index would round to a
# neighbouring crop's.
PATCHES_PER_CALL = 256


def select_mimic_rois(
    sampling_results: List[SamplingResult], num_rois: int, mimic_on: str, num_classes: int
) -> Tuple[Tensor, Tensor]:
    """Up to ``num_rois`` random RoIs per image from the sampler's: positives (``'fg'``), negatives
    (``'bg'``) or either (``'all'``).

    Returns their indices into ``bbox2roi([res.priors for res in sampling_results])`` (each image's
    positives come first, then its negatives) and their labels (background = ``num_classes``).
    """
    indices, labels, start = [], [], 0
    for res in sampling_results:
        num_pos, num_neg = res.pos_inds.numel(), res.neg_inds.numel()
        device = res.pos_inds.device
        image_labels = torch.cat(
            [res.pos_gt_labels.long(), torch.full((num_neg,), num_classes, dtype=torch.long, device=device)]
        )
        first, last = {"fg": (0, num_pos), "bg": (num_pos, num_pos + num_neg), "all": (0, num_pos + num_neg)}[mimic_on]
        candidates = torch.arange(first, last, device=device)
        if candidates.numel() > num_rois:
            candidates = candidates[torch.randperm(candidates.numel(), device=device)[:num_rois]]
        indices.append(candidates + start)
        labels.append(image_labels[candidates])
        start += num_pos + num_neg
    return torch.cat(indices), torch.cat(labels)


def crop_and_resize(images: Tensor, rois: Tensor, size: int) -> Tensor:
    """(R, C, size, size) crops of ``images`` at ``rois`` (rows of batch index, x1, y1, x2, y2).

    One RoIAlign over the batch (our deform_roi_pool without offsets, aligned convention): bilinear
    where a RoI is enlarged, and averaging ceil(RoI side / size) samples per side where it is shrunk,
    so large RoIs are not aliased.
    """
    boxes = rois[:, 1:].detach()
    centre = (boxes[:, :2] + boxes[:, 2:]) / 2
    half = (boxes[:, 2:] - boxes[:, :2]).clamp(min=MIN_CROP_SIDE) / 2
    crop_rois = torch.cat([rois[:, :1].detach(), centre - half, centre + half], dim=1)
    return deform_roi_pool(
        images, crop_rois.to(images.dtype), None, output_size=size, spatial_scale=1.0, sampling_ratio=0
    )


def pool_patches(roi_extractor: nn.Module, crop_feats: Tuple[Tensor, ...], crop_size: int) -> Tensor:
    """Each crop's whole patch, (0, 0, crop_size, crop_size), pooled by ``roi_extractor`` from the
    crops' feature maps (at most PATCHES_PER_CALL crops per call)."""
    feats = crop_feats[: roi_extractor.num_inputs]
    pooled = []
    for start in range(0, len(feats[0]), PATCHES_PER_CALL):
        chunk = [f[start : start + PATCHES_PER_CALL] for f in feats]
        count = len(chunk[0])
        rois = chunk[0].new_tensor([0.0, 0.0, 0.0, crop_size, crop_size], dtype=torch.float32).repeat(count, 1)
        rois[:, 0] = torch.arange(count, dtype=torch.float32, device=rois.device)
        pooled.append(roi_extractor(chunk, rois))
    return torch.cat(pooled)


def shared_fc_features(bbox_head: ConvFCBBoxHead, roi_feats: Tensor) -> Tensor:
    """The output of a ConvFCBBoxHead's shared branch, which its ``forward`` computes but does not
    return (the same steps, on the same modules)."""
    x = roi_feats
    for conv in bbox_head.shared_convs:
        x = conv(x)
    if bbox_head.with_avg_pool:
        x = bbox_head.avg_pool(x)
    x = x.flatten(1)
    for fc in bbox_head.shared_fcs:
        x = bbox_head.relu(fc(x))
    return x


@MODELS.register_module()
class RCNNMimicRoIHead(StandardRoIHead):
    """StandardRoIHead + R-CNN feature mimicking in training (see the module docstring).

    Args:
        num_rois: RoIs mimicked per image, at most (paper: 32).
        crop_size: side of the square crops in pixels (paper: 224).
        mimic_on: which of the sampler's RoIs: ``'fg'`` (positives, the paper's best), ``'bg'`` or ``'all'``.
        loss_mimic: config of the eq. 3 loss (``CosineMimicLoss``, weight 0.1).
        loss_rcnn_cls: config of the R-CNN classifier's loss (cross-entropy, weight 0.1).
        Everything else as StandardRoIHead. The bbox head must be a ConvFCBBoxHead with shared fcs
        (e.g. ``Shared2FCBBoxHead``): their output is the mimicked feature.
    """

    def __init__(
        self,
        *args,
        num_rois: int = 32,
        crop_size: int = 224,
        mimic_on: str = "fg",
        # dict defaults as mmdet's heads have them; only read (built), never mutated
        loss_mimic: ConfigType = dict(type="CosineMimicLoss", loss_weight=0.1),  # noqa: B006
        loss_rcnn_cls: ConfigType = dict(type="CrossEntropyLoss", use_sigmoid=False, loss_weight=0.1),  # noqa: B006
        **kwargs,
    ) -> None:
        for name, value in (("num_rois", num_rois), ("crop_size", crop_size)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"RCNNMimicRoIHead: {name} must be a positive int, got {value!r}")
        if mimic_on not in MIMIC_ON:
            raise ValueError(f"RCNNMimicRoIHead: mimic_on must be one of {MIMIC_ON}, got {mimic_on!r}")
        super().__init__(*args, **kwargs)
        if not (isinstance(self.bbox_head, ConvFCBBoxHead) and self.bbox_head.num_shared_fcs > 0):
            raise ValueError(
                "RCNNMimicRoIHead: bbox_head must be a ConvFCBBoxHead with shared fcs (e.g. "
                f"Shared2FCBBoxHead), whose output is the mimicked feature; got "
                f"{type(self.bbox_head).__name__}"
            )
        self.num_rois, self.crop_size, self.mimic_on = num_rois, crop_size, mimic_on
        self.loss_mimic = MODELS.build(loss_mimic)
        self.loss_rcnn_cls = MODELS.build(loss_rcnn_cls)
        self.rcnn_cls = nn.Linear(self.bbox_head.shared_out_channels, self.bbox_head.num_classes + 1)
        self._mimic_source: Optional[Tuple[Tensor, Callable]] = None

    def init_weights(self) -> None:
        super().init_weights()
        nn.init.normal_(self.rcnn_cls.weight, std=0.01)  # as mmdet's fc_cls
        nn.init.zeros_(self.rcnn_cls.bias)

    @contextmanager
    def mimic_source(self, batch_inputs: Tensor, extract_feat: Callable[[Tensor], Tuple[Tensor, ...]]):
        """Within this context ``loss`` can crop RoIs from ``batch_inputs`` (the normalised batch) and
        run them through ``extract_feat`` (the detector's backbone + neck). Held only for the call:
        the head keeps no reference to the detector or its images."""
        self._mimic_source = (batch_inputs, extract_feat)
        try:
            yield
        finally:
            self._mimic_source = None

    def bbox_loss(self, x: Tuple[Tensor], sampling_results: List[SamplingResult]) -> dict:
        bbox_results = super().bbox_loss(x, sampling_results)
        bbox_results["loss_bbox"].update(self.mimic_loss(sampling_results, bbox_results["bbox_feats"]))
        return bbox_results

    def mimic_loss(self, sampling_results: List[SamplingResult], bbox_feats: Tensor) -> Dict[str, Tensor]:
        """``loss_mimic`` and ``loss_rcnn_cls`` for the RoIs of ``sampling_results``, whose Fast R-CNN
        RoI features (in bbox2roi order) are ``bbox_feats``."""
        if self._mimic_source is None:
            raise RuntimeError(
                "RCNNMimicRoIHead needs the input images in training: build the detector as "
                "MimicFasterRCNN or MimicMaskRCNN (or call loss inside head.mimic_source(...))"
            )
        images, extract_feat = self._mimic_source
        indices, labels = select_mimic_rois(sampling_results, self.num_rois, self.mimic_on, self.bbox_head.num_classes)
        if indices.numel() == 0:
            # Zero losses still connected to every parameter they would train, so that no parameter
            # goes without a gradient on one process of a distributed run (DDP would stop).
            return dict(
                loss_mimic=bbox_feats.sum() * 0, loss_rcnn_cls=sum(p.sum() for p in self.rcnn_cls.parameters()) * 0
            )

        rois = bbox2roi([res.priors for res in sampling_results])
        crops = crop_and_resize(images, rois[indices], self.crop_size)
        patch_feats = pool_patches(self.bbox_roi_extractor, extract_feat(crops), self.crop_size)
        if self.with_shared_head:
            patch_feats = self.shared_head(patch_feats)
        f_rcnn = shared_fc_features(self.bbox_head, patch_feats)
        f_frcnn = shared_fc_features(self.bbox_head, bbox_feats[indices])
        return dict(
            loss_mimic=self.loss_mimic(f_rcnn, f_frcnn, avg_factor=len(sampling_results)),
            loss_rcnn_cls=self.loss_rcnn_cls(self.rcnn_cls(f_rcnn).float(), labels),
        )
