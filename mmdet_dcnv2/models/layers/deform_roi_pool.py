"""Deformable RoI pooling layers on our kernels: drop-ins for mmcv's ``DeformRoIPoolPack`` (DPool)
and ``ModulatedDeformRoIPoolPack`` (MDPool).

Both pool each RoI plainly first (RoIAlign-style, ``offset=None``), predict per-bin offsets (and,
for MDPool, modulation scalars) from those features with fc branches, then pool again with the
offsets. The branches keep mmcv's layout and initialisation, so checkpoints load unchanged:
``offset_fc`` = Linear-ReLU-Linear-ReLU-Linear(-> 2 * bins), ``mask_fc`` = Linear-ReLU-Linear-Sigmoid
(-> bins), and only the last Linear of each branch starts at zero (offsets 0, masks 0.5).

Size: the first Linear of each branch maps ``output_channels * bins`` to ``deform_fc_channels``.
With mmdet's 256 channels and 1024 hidden units an MDPool has about 27M parameters at 7x7 and about
104M at 14x14 -- and mmdet builds one per FPN level (see ``share_roi_layer`` of our RoI extractors).
"""

from typing import Optional, Tuple, Union

from mmdet.registry import MODELS
from torch import Tensor, nn
from torch.nn.modules.utils import _pair

from mmdet_dcnv2.ops import deform_roi_pool


class _DeformRoIPoolPack(nn.Module):
    """What DPool and MDPool share: mmcv's attributes, the plain first pass and the offset branch."""

    def __init__(
        self,
        output_size: Union[int, Tuple[int, int]],
        output_channels: int,
        deform_fc_channels: int = 1024,
        spatial_scale: float = 1.0,
        sampling_ratio: int = 0,
        gamma: float = 0.1,
    ) -> None:
        super().__init__()
        self.output_size = _pair(output_size)  # mmdet's extractors read it as a tuple
        self.output_channels = output_channels
        self.deform_fc_channels = deform_fc_channels
        self.spatial_scale = float(spatial_scale)
        self.sampling_ratio = int(sampling_ratio)
        self.gamma = float(gamma)
        for name, value in (
            ("output_size", min(self.output_size)),
            ("output_channels", output_channels),
            ("deform_fc_channels", deform_fc_channels),
        ):
            if value < 1:
                raise ValueError(f"{type(self).__name__}: {name} must be positive, got {value}")
        self.offset_fc = nn.Sequential(
            nn.Linear(self.num_bins * output_channels, deform_fc_channels),
            nn.ReLU(inplace=True),
            nn.Linear(deform_fc_channels, deform_fc_channels),
            nn.ReLU(inplace=True),
            nn.Linear(deform_fc_channels, self.num_bins * 2),
        )
        _zero_init(self.offset_fc[-1])

    @property
    def num_bins(self) -> int:
        return self.output_size[0] * self.output_size[1]

    def _pool(self, input: Tensor, rois: Tensor, offset: Optional[Tensor], spatial_scale: float) -> Tensor:
        return deform_roi_pool(input, rois, offset, self.output_size, spatial_scale, self.sampling_ratio, self.gamma)

    def _plain_features(self, input: Tensor, rois: Tensor, spatial_scale: Optional[float]):
        """The first, offset-free pass, flattened per RoI for the fc branches."""
        if input.size(1) != self.output_channels:
            raise ValueError(
                f"{type(self).__name__} was built with output_channels={self.output_channels} "
                f"but got a feature map with {input.size(1)} channels"
            )
        scale = self.spatial_scale if spatial_scale is None else spatial_scale
        return self._pool(input, rois, None, scale).flatten(1), scale  # flatten(1) keeps 0 RoIs working

    def _offset(self, features: Tensor) -> Tensor:
        return self.offset_fc(features).view(-1, 2, *self.output_size)

    def extra_repr(self) -> str:
        return (
            f"output_size={self.output_size}, output_channels={self.output_channels}, "
            f"deform_fc_channels={self.deform_fc_channels}, spatial_scale={self.spatial_scale}, "
            f"sampling_ratio={self.sampling_ratio}, gamma={self.gamma}"
        )


def _zero_init(linear: nn.Linear) -> None:
    nn.init.zeros_(linear.weight)
    nn.init.zeros_(linear.bias)


@MODELS.register_module()
class DPool(_DeformRoIPoolPack):
    """Deformable RoI pooling (DCNv1), a drop-in for mmcv's ``DeformRoIPoolPack``.

    ``forward(input, rois)`` as mmcv's; ``spatial_scale`` may be given per call (it overrides the
    one built in), which is how one layer serves every FPN level.
    """

    def forward(self, input: Tensor, rois: Tensor, spatial_scale: Optional[float] = None) -> Tensor:
        features, scale = self._plain_features(input, rois, spatial_scale)
        return self._pool(input, rois, self._offset(features), scale)


@MODELS.register_module()
class MDPool(_DeformRoIPoolPack):
    """Modulated deformable RoI pooling (DCNv2), a drop-in for mmcv's ``ModulatedDeformRoIPoolPack``.

    Each bin's pooled value is scaled by a modulation scalar in (0, 1) from ``mask_fc``.
    ``spatial_scale`` may be given per call, as for :class:`DPool`.
    """

    def __init__(
        self,
        output_size: Union[int, Tuple[int, int]],
        output_channels: int,
        deform_fc_channels: int = 1024,
        spatial_scale: float = 1.0,
        sampling_ratio: int = 0,
        gamma: float = 0.1,
    ) -> None:
        super().__init__(output_size, output_channels, deform_fc_channels, spatial_scale, sampling_ratio, gamma)
        self.mask_fc = nn.Sequential(
            nn.Linear(self.num_bins * output_channels, deform_fc_channels),
            nn.ReLU(inplace=True),
            nn.Linear(deform_fc_channels, self.num_bins),
            nn.Sigmoid(),
        )
        _zero_init(self.mask_fc[2])

    def forward(self, input: Tensor, rois: Tensor, spatial_scale: Optional[float] = None) -> Tensor:
        features, scale = self._plain_features(input, rois, spatial_scale)
        mask = self.mask_fc(features).view(-1, 1, *self.output_size)
        return self._pool(input, rois, self._offset(features), scale) * mask
