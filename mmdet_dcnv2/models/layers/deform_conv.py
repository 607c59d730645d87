"""Deformable convolution layers on our kernels: drop-ins for mmcv's DCN "Pack" modules.

``MDConv`` replaces mmcv's ``ModulatedDeformConv2dPack`` (DCNv2) and ``DConv`` its
``DeformConv2dPack`` (DCNv1). Constructor arguments, attributes and state_dict keys are mmcv's, so
configs and model-zoo checkpoints work unchanged; the offsets (and masks) come from a sibling
``conv_offset`` with the layer's own kernel size, stride, padding and dilation.
"""

import math
from typing import Optional, Tuple, Union

import torch
from mmdet.registry import MODELS
from mmengine.utils import deprecated_api_warning
from torch import Tensor, nn
from torch.nn.modules.utils import _pair, _single

from mmdet_dcnv2.ops import modulated_deform_conv2d

IntPair = Union[int, Tuple[int, int]]


class _DeformConvPack(nn.Module):
    """What MDConv and DConv share: mmcv's attributes, argument checks and the offset conv.

    Subclasses set ``points_per_tap``, how many channels of ``conv_offset`` each kernel tap of
    each deformable group gets (2 for (dy, dx); 3 with the modulation scalar), and define
    ``reset_parameters`` (the weight initialisation of their mmcv counterpart) and
    ``offset_and_mask`` (how ``conv_offset``'s channels become the op's offsets and masks).
    """

    points_per_tap: int
    # mmcv's version 2 renamed the offset conv to `conv_offset`; keeping the number keeps the
    # checkpoints' metadata identical to mmcv's.
    _version = 2

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: IntPair,
        stride: IntPair = 1,
        padding: IntPair = 0,
        dilation: IntPair = 1,
        groups: int = 1,
        deform_groups: int = 1,
        bias: Union[bool, str] = True,
    ) -> None:
        super().__init__()
        checks = (
            ("in_channels", in_channels, "groups", groups),
            ("out_channels", out_channels, "groups", groups),
            ("in_channels", in_channels, "deform_groups", deform_groups),
        )
        for arg, value, divisor_name, divisor in checks:
            if divisor < 1 or value % divisor != 0:
                raise ValueError(
                    f"{type(self).__name__}: {arg} ({value}) must be divisible by {divisor_name} ({divisor})"
                )
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel_size = _pair(kernel_size)
        self.stride = _pair(stride)
        self.padding = _pair(padding)
        self.dilation = _pair(dilation)
        self.groups = groups
        self.deform_groups = deform_groups
        # mmcv's ConvModule reads these, as it would from an nn.Conv2d.
        self.transposed = False
        self.output_padding = _single(0)

        self.weight = nn.Parameter(torch.empty(out_channels, in_channels // groups, *self.kernel_size))
        if bias:  # mmcv accepts the string 'auto' here too (ConvModule resolves it before)
            self.bias = nn.Parameter(torch.empty(out_channels))
        else:
            self.register_parameter("bias", None)
        taps = self.kernel_size[0] * self.kernel_size[1]
        self.conv_offset = nn.Conv2d(
            in_channels,
            deform_groups * self.points_per_tap * taps,
            kernel_size=self.kernel_size,
            stride=self.stride,
            padding=self.padding,
            dilation=self.dilation,
            bias=True,
        )
        self.init_weights()

    def init_offset(self) -> None:
        """Zero the offset conv: training starts as a regular convolution (and masks at 0.5)."""
        nn.init.zeros_(self.conv_offset.weight)
        nn.init.zeros_(self.conv_offset.bias)

    def init_weights(self) -> None:
        # ConvModule (and mmengine's BaseModule, after a parent's Kaiming init_cfg has touched every
        # nn.Conv2d, conv_offset included) call this instead of their own initialisation.
        self.reset_parameters()
        self.init_offset()

    def offset_and_mask(self, x: Tensor) -> Tuple[Tensor, Optional[Tensor]]:
        """What the layer samples ``x`` with: offsets (N, 2 * deform_groups * taps, Ho, Wo), (dy, dx) per
        tap, and masks (N, deform_groups * taps, Ho, Wo), or None for DConv (no modulation)."""
        raise NotImplementedError

    def forward(self, x: Tensor) -> Tensor:
        offset, mask = self.offset_and_mask(x)
        return modulated_deform_conv2d(
            x,
            offset,
            mask,
            self.weight,
            self.bias,
            self.stride,
            self.padding,
            self.dilation,
            self.groups,
            self.deform_groups,
        )

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
            f"stride={self.stride}, padding={self.padding}, dilation={self.dilation}, "
            f"groups={self.groups}, deform_groups={self.deform_groups}, bias={self.bias is not None}"
        )


@MODELS.register_module()
class MDConv(_DeformConvPack):
    """Modulated deformable convolution (DCNv2), a drop-in for mmcv's ``ModulatedDeformConv2dPack``.

    ``conv_offset`` predicts 3 * deform_groups * kh * kw channels, split as mmcv does:
    ``o1, o2, m = out.chunk(3, dim=1)``; offsets ``cat(o1, o2)``, masks ``sigmoid(m)``.
    Also registered as ``DCNv2`` (see :mod:`mmdet_dcnv2.registry_overrides`).
    """

    points_per_tap = 3

    @deprecated_api_warning({"deformable_groups": "deform_groups"}, cls_name="MDConv")
    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: IntPair,
        stride: IntPair = 1,
        padding: IntPair = 0,
        dilation: IntPair = 1,
        groups: int = 1,
        deform_groups: int = 1,
        bias: Union[bool, str] = True,
    ) -> None:
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, deform_groups, bias)

    def reset_parameters(self) -> None:
        # mmcv's ModulatedDeformConv2d initialisation.
        stdv = 1.0 / math.sqrt(self.in_channels * self.kernel_size[0] * self.kernel_size[1])
        nn.init.uniform_(self.weight, -stdv, stdv)
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def offset_and_mask(self, x: Tensor) -> Tuple[Tensor, Tensor]:
        o1, o2, mask = torch.chunk(self.conv_offset(x), 3, dim=1)
        return torch.cat((o1, o2), dim=1), torch.sigmoid(mask)


@MODELS.register_module()
class DConv(_DeformConvPack):
    """Deformable convolution (DCNv1, no modulation), a drop-in for mmcv's ``DeformConv2dPack``.

    ``conv_offset`` predicts 2 * deform_groups * kh * kw channels. Unlike mmcv's, a bias is
    allowed (mmcv's layer has none, and neither does ours with the default ``bias=False``).
    ``im2col_step`` is accepted for mmcv's signature only: our kernel sizes its batch chunks by a
    memory budget instead (``mmdet_dcnv2.ops.set_column_budget``). Also registered as ``DCN``.
    """

    points_per_tap = 2

    @deprecated_api_warning({"deformable_groups": "deform_groups"}, cls_name="DConv")
    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: IntPair,
        stride: IntPair = 1,
        padding: IntPair = 0,
        dilation: IntPair = 1,
        groups: int = 1,
        deform_groups: int = 1,
        bias: bool = False,
        im2col_step: int = 32,
    ) -> None:
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, deform_groups, bias)

    def reset_parameters(self) -> None:
        # mmcv's DeformConv2d initialisation.
        nn.init.kaiming_uniform_(self.weight, nonlinearity="relu")
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def offset_and_mask(self, x: Tensor) -> Tuple[Tensor, None]:
        return self.conv_offset(x), None
