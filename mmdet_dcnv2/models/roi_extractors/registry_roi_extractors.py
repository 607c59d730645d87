"""mmdet's RoI extractors, with the roi_layer type resolved through the registry first.

mmdet's ``BaseRoIExtractor.build_roi_layers`` takes the roi_layer class from ``mmcv.ops`` by name
(``getattr(mmcv.ops, type)``), bypassing the registry, so no plugin can supply a RoI layer to an
unmodified config. These subclasses look the type up in mmdet's ``MODELS`` registry (and its
parents) first and fall back to ``mmcv.ops``, so ``RoIAlign`` and every other mmcv layer still work.
They also check, at build time, that a layer declaring ``output_channels`` (the deformable RoI
pools) agrees with the extractor's ``out_channels``, and can share one RoI layer across FPN levels.

They are always registered under their own names; ``mmdet_dcnv2.registry_overrides`` also puts them
in place of ``SingleRoIExtractor`` and ``GenericRoIExtractor`` unless MMDET_DCNV2_OVERRIDE=0.
"""

import inspect
from typing import List, Union

import mmcv.ops
from mmdet.models.roi_heads.roi_extractors import GenericRoIExtractor, SingleRoIExtractor
from mmdet.registry import MODELS
from mmdet.utils import ConfigType
from torch import Tensor, nn


def resolve_roi_layer(layer_type: Union[str, type]) -> type:
    """The class a roi_layer ``type`` names: mmdet's registry (and its parents), then ``mmcv.ops``."""
    if inspect.isclass(layer_type):
        return layer_type
    layer_cls = MODELS.get(layer_type) or getattr(mmcv.ops, layer_type, None)
    if layer_cls is None:
        raise KeyError(
            f"roi_layer type {layer_type!r} is neither registered in mmdet's MODELS registry "
            f"(e.g. 'MDPool', 'DPool') nor a class of mmcv.ops (e.g. 'RoIAlign')"
        )
    return layer_cls


class _PyramidLevel:
    """One FPN level's view of a RoI layer shared by all levels: the layer at that level's scale.

    Deliberately not an nn.Module, so the shared layer's parameters appear once in the model.
    """

    def __init__(self, layer: nn.Module, spatial_scale: float) -> None:
        self.layer = layer
        self.spatial_scale = spatial_scale

    @property
    def output_size(self):
        return self.layer.output_size

    def __call__(self, feats: Tensor, rois: Tensor) -> Tensor:
        return self.layer(feats, rois, spatial_scale=self.spatial_scale)


class RegistryRoILayerMixin:
    """``build_roi_layers`` through the registry, the channel check and the ``share_roi_layer`` option.

    Args (besides the extractor's own):
        share_roi_layer (bool): build one RoI layer for all FPN levels instead of one per level
            (mmdet's default). Worth it for the deformable pools, whose fc branches are large
            (about 27M parameters per 7x7 MDPool). The layer's ``forward`` must accept
            ``spatial_scale`` (ours do). The parameters then live in ``shared_roi_layer``.
    """

    def __init__(self, *args, share_roi_layer: bool = False, **kwargs) -> None:
        self.share_roi_layer = share_roi_layer  # read by build_roi_layers, which the base __init__ calls
        super().__init__(*args, **kwargs)
        layer = self.shared_roi_layer if share_roi_layer else self.roi_layers[0]
        layer_channels = getattr(layer, "output_channels", None)
        if layer_channels is not None and layer_channels != self.out_channels:
            raise ValueError(
                f"{type(self).__name__}: roi_layer {type(layer).__name__} has "
                f"output_channels={layer_channels} but the extractor's out_channels is "
                f"{self.out_channels}; they must be equal (the channels of the pooled "
                "feature maps)"
            )

    def build_roi_layers(self, layer_cfg: ConfigType, featmap_strides: List[int]):
        cfg = layer_cfg.copy()
        layer_cls = resolve_roi_layer(cfg.pop("type"))
        if not self.share_roi_layer:
            return nn.ModuleList([layer_cls(spatial_scale=1 / s, **cfg) for s in featmap_strides])
        if "spatial_scale" not in inspect.signature(layer_cls.forward).parameters:
            raise ValueError(
                f"{type(self).__name__}: share_roi_layer=True needs a roi_layer whose forward "
                f"takes spatial_scale (MDPool, DPool); {layer_cls.__name__}'s does not"
            )
        self.shared_roi_layer = layer_cls(spatial_scale=1 / featmap_strides[0], **cfg)
        return tuple(_PyramidLevel(self.shared_roi_layer, 1 / s) for s in featmap_strides)


@MODELS.register_module()
class RegistrySingleRoIExtractor(RegistryRoILayerMixin, SingleRoIExtractor):
    """mmdet's ``SingleRoIExtractor`` with the roi_layer resolved through the registry."""


@MODELS.register_module()
class RegistryGenericRoIExtractor(RegistryRoILayerMixin, GenericRoIExtractor):
    """mmdet's ``GenericRoIExtractor`` with the roi_layer resolved through the registry."""
