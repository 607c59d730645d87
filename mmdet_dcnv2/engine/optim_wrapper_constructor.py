"""``dcn_offset_lr_mult`` for our deformable convolutions.

mmengine's ``DefaultOptimWrapperConstructor`` applies ``paramwise_cfg.dcn_offset_lr_mult`` to a
``conv_offset`` only when its parent is an instance of mmcv's ``DeformConv2d`` or
``ModulatedDeformConv2d``, so on MDConv/DConv the option silently does nothing. This subclass treats
the offset convs of our layers exactly as mmengine treats mmcv's (learning rate times the
multiplier, exempt from ``bias_lr_mult``/``bias_decay_mult``/``flat_decay_mult``) and is otherwise
mmengine's constructor. The paper trains the offset/mask convs at 0.1x::

    optim_wrapper = dict(constructor='DCNv2OptimWrapperConstructor',
                         paramwise_cfg=dict(dcn_offset_lr_mult=0.1))

Only the convolutions' ``conv_offset`` is affected: MDPool's fc branches keep the normal rate, as in
the paper. ``mmdet_dcnv2.registry_overrides`` also installs it as mmdet's
``DefaultOptimWrapperConstructor`` (unless MMDET_DCNV2_OVERRIDE=0).
"""

from typing import List, Optional, Union

from mmdet.registry import OPTIM_WRAPPER_CONSTRUCTORS
from mmengine.optim import DefaultOptimWrapperConstructor, OptimWrapper
from torch import nn

from mmdet_dcnv2.models.layers import DConv, MDConv

from .model_wrappers import unwrap_model


@OPTIM_WRAPPER_CONSTRUCTORS.register_module()
class DCNv2OptimWrapperConstructor(DefaultOptimWrapperConstructor):
    """mmengine's default optimizer-wrapper constructor, recognising MDConv and DConv as DCN layers."""

    def __call__(self, model: nn.Module) -> OptimWrapper:
        self._our_offset_convs = {
            m.conv_offset for m in unwrap_model(model).modules() if isinstance(m, (MDConv, DConv))
        }
        try:
            return super().__call__(model)
        finally:
            del self._our_offset_convs

    def add_params(
        self, params: List[dict], module: nn.Module, prefix: str = "", is_dcn_module: Optional[Union[int, float]] = None
    ) -> None:
        # The base class passes is_dcn_module=True to the children of mmcv's layers; do the same for ours.
        if module in getattr(self, "_our_offset_convs", ()):
            is_dcn_module = True
        super().add_params(params, module, prefix=prefix, is_dcn_module=is_dcn_module)
