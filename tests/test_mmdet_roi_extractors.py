"""The registry-aware RoI extractors: our pools by name, every mmcv roi_layer still, build-time
checks, and one RoI layer shared across FPN levels."""

import pytest
import torch

pytest.importorskip("mmdet")
mmcv_ops = pytest.importorskip("mmcv.ops")

from mmdet.registry import MODELS  # noqa: E402

from mmdet_dcnv2.models import MDPool, RegistryGenericRoIExtractor, RegistrySingleRoIExtractor  # noqa: E402

STRIDES = [4, 8, 16, 32]


pytestmark = pytest.mark.usefixtures("mmdet_scope")


def _extractor(roi_layer, out_channels=8, **kwargs):
    return MODELS.build(
        dict(
            type="SingleRoIExtractor", roi_layer=roi_layer, out_channels=out_channels, featmap_strides=STRIDES, **kwargs
        )
    )


def _feats_and_rois():
    torch.manual_seed(0)
    feats = [torch.randn(2, 8, 128 // s, 128 // s) for s in STRIDES]
    rois = torch.tensor([[0, 4.0, 4.0, 30.0, 28.0], [1, 10.0, 20.0, 120.0, 110.0], [0, 0.0, 0.0, 64.0, 127.0]])
    return feats, rois


def test_stock_extractor_names_resolve_to_ours():
    assert MODELS.get("SingleRoIExtractor") is RegistrySingleRoIExtractor
    assert MODELS.get("GenericRoIExtractor") is RegistryGenericRoIExtractor


@pytest.mark.parametrize(
    "layer_type, expected",
    [
        ("ModulatedDeformRoIPoolPack", MDPool),
        ("MDPool", MDPool),
        ("RoIAlign", mmcv_ops.RoIAlign),
        ("RoIPool", mmcv_ops.RoIPool),
    ],
)
def test_roi_layer_types_resolve_registry_first_then_mmcv_ops(layer_type, expected):
    cfg = dict(type=layer_type, output_size=7)
    if expected is MDPool:
        cfg.update(output_channels=8, deform_fc_channels=16)
    extractor = _extractor(cfg)
    assert all(type(layer) is expected for layer in extractor.roi_layers)
    assert [layer.spatial_scale for layer in extractor.roi_layers] == [1 / s for s in STRIDES]
    if expected is not mmcv_ops.RoIPool:  # mmcv has no CPU RoIPool kernel
        feats, rois = _feats_and_rois()
        assert extractor(feats, rois).shape == (3, 8, 7, 7)


def test_generic_extractor_takes_our_pool():
    extractor = MODELS.build(
        dict(
            type="GenericRoIExtractor",
            aggregation="sum",
            out_channels=8,
            featmap_strides=STRIDES,
            roi_layer=dict(type="MDPool", output_size=7, output_channels=8, deform_fc_channels=16),
        )
    )
    feats, rois = _feats_and_rois()
    assert extractor(feats, rois).shape == (3, 8, 7, 7)


def test_unknown_roi_layer_type_fails_at_build_time_naming_it():
    with pytest.raises(KeyError, match="'MDPol' is neither registered in mmdet's MODELS registry"):
        _extractor(dict(type="MDPol", output_size=7))


def test_mdpool_output_channels_must_match_the_extractor():
    with pytest.raises(ValueError, match="output_channels=256 but the extractor's out_channels is 8"):
        _extractor(dict(type="MDPool", output_size=7, output_channels=256, deform_fc_channels=16))


def test_one_mdpool_shared_across_levels():
    cfg = dict(type="MDPool", output_size=7, output_channels=8, deform_fc_channels=16)
    shared, per_level = _extractor(cfg, share_roi_layer=True), _extractor(cfg)
    one_pool = sum(p.numel() for p in MDPool(7, 8, 16).parameters())
    assert sum(p.numel() for p in shared.parameters()) == one_pool
    assert sum(p.numel() for p in per_level.parameters()) == 4 * one_pool
    assert all(key.startswith("shared_roi_layer.") for key in shared.state_dict())

    # Same weights in every level: the shared extractor pools exactly like per-level copies of it.
    for layer in per_level.roi_layers:
        layer.load_state_dict(shared.shared_roi_layer.state_dict())
    feats, rois = _feats_and_rois()
    torch.testing.assert_close(shared(feats, rois), per_level(feats, rois))


def test_sharing_a_layer_without_per_call_spatial_scale_is_refused():
    with pytest.raises(ValueError, match="share_roi_layer=True needs a roi_layer whose forward takes spatial_scale"):
        _extractor(dict(type="RoIAlign", output_size=7), share_roi_layer=True)
