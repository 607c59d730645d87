"""measure_deform_health against hand counts and against the kernel itself, and DeformHealthHook in a
fake runner (arguments, sources, no-DCN models, resume) and in mmengine's Runner (2 iterations)."""

import json
import math
import os
from types import SimpleNamespace

import pytest
import torch
from torch import nn

pytest.importorskip("mmdet")

from mmdet_dcnv2.engine import DeformHealthHook, measure_deform_health  # noqa: E402
from mmdet_dcnv2.models import DConv, MDConv  # noqa: E402
from mmdet_dcnv2.ops import modulated_deform_conv2d  # noqa: E402

SEED = 20190218


def _forward(model, inputs):
    return model(inputs)


def _zero_offset_outside_fraction(height, width):
    """3x3, stride 1, pad 1, zero offsets: tap i of output row ho samples row ho - 1 + i. The taps that
    land on row -1 or row H (column -1 or W) read zero; per dimension the 3 * H row samples hold
    exactly 2 such (ho = 0, i = 0 and ho = H - 1, i = 2), so 3H - 2 rows and 3W - 2 columns are in."""
    inside = (3 * height - 2) * (3 * width - 2)
    return 1 - inside / (9 * height * width)


def _kernel_outside_fraction(layer, x_shape, offset, mask):
    """The mask-weighted fraction of sampling points at which the op itself reads zero: it samples an
    all-ones map with a one-hot weight per (deform group, tap), so output channel g * taps + k is
    tap k's bilinear sample, which is zero exactly where the op reads nothing."""
    n, _, height, width = x_shape
    groups = layer.deform_groups
    kh, kw = layer.kernel_size
    taps = kh * kw
    ones = torch.ones(n, groups, height, width, dtype=offset.dtype)
    weight = torch.zeros(groups * taps, groups, kh, kw, dtype=offset.dtype)
    for g in range(groups):
        for k in range(taps):
            weight[g * taps + k, g, k // kw, k % kw] = 1
    with torch.no_grad():
        sampled = modulated_deform_conv2d(
            ones, offset, None, weight, None, layer.stride, layer.padding, layer.dilation, 1, groups
        )
    zero = (sampled == 0).double()
    weights = torch.ones_like(zero) if mask is None else mask.double()
    return ((zero * weights).sum() / weights.sum()).item()


@pytest.mark.parametrize("cls", [MDConv, DConv])
@pytest.mark.parametrize("height,width", [(4, 5), (1, 3)])
def test_zero_offsets_read_zero_exactly_on_the_padding_ring(cls, height, width):
    layer = cls(2, 3, 3, padding=1)
    x = torch.randn(2, 2, height, width)
    result = measure_deform_health(layer, x, forward=_forward)
    assert set(result) == {""}  # the model is the layer: its module name is ""
    stats = result[""]
    assert stats["median_offset_px"] == 0.0
    assert stats["outside_fraction"] == pytest.approx(_zero_offset_outside_fraction(height, width), abs=1e-12)
    assert stats["padding_fraction"] == pytest.approx(stats["outside_fraction"], abs=1e-12)
    assert stats["map_hw"] == (height, width) and stats["calls"] == 1
    if cls is MDConv:
        assert stats["mean_mask"] == pytest.approx(0.5)  # sigmoid(0) everywhere: weighted = unweighted
    else:
        assert stats["mean_mask"] is None


def test_the_hand_count_for_a_4x4_map():
    # 4x4: 10 of 12 row samples and 10 of 12 column samples are in; 100 of 144 points.
    assert _zero_offset_outside_fraction(4, 4) == pytest.approx(44 / 144)


@pytest.mark.parametrize("cls", [MDConv, DConv])
def test_a_large_constant_offset_pushes_every_point_outside(cls):
    layer = cls(2, 2, 3, padding=1)
    offsets = 2 * 9  # the first 18 channels of conv_offset are the offsets in both classes
    with torch.no_grad():
        layer.conv_offset.bias[:offsets] = 100.0
    stats = measure_deform_health(layer, torch.randn(1, 2, 6, 6), forward=_forward)[""]
    assert stats["outside_fraction"] == 1.0
    assert stats["median_offset_px"] == pytest.approx(100 * math.sqrt(2))
    assert stats["padding_fraction"] == pytest.approx(_zero_offset_outside_fraction(6, 6))


def test_the_mask_weights_the_fraction_outside_taps_with_zero_mask_count_for_nothing():
    # conv_offset zero-pads its input like the layer: on an all-ones input, mask channel k with a
    # one-hot weight at tap k sees 1 where tap k is in the map and 0 where it is on the padding.
    layer = MDConv(1, 1, 3, padding=1)
    with torch.no_grad():
        for k in range(9):
            layer.conv_offset.weight[2 * 9 + k, 0, k // 3, k % 3] = 60.0
        layer.conv_offset.bias[2 * 9 :] = -30.0  # logits +30 inside, -30 outside
    stats = measure_deform_health(layer, torch.ones(1, 1, 4, 4), forward=_forward)[""]
    assert stats["median_offset_px"] == 0.0
    assert stats["outside_fraction"] < 1e-12
    assert stats["mean_mask"] == pytest.approx(100 / 144, abs=1e-9)  # ~1 on the 100 inside points


def test_all_zero_masks_fall_back_to_the_unweighted_fraction():
    layer = MDConv(1, 1, 3, padding=1)
    zero_offset = torch.zeros(1, 18, 4, 4)
    layer.offset_and_mask = lambda x: (zero_offset, torch.zeros(1, 9, 4, 4))
    stats = measure_deform_health(layer, torch.ones(1, 1, 4, 4), forward=_forward)[""]
    assert stats["outside_fraction"] == pytest.approx(44 / 144) and stats["mean_mask"] == 0.0


CONFIGS = [
    dict(kernel_size=3, stride=1, padding=1, dilation=1, deform_groups=1),
    dict(kernel_size=3, stride=2, padding=1, dilation=1, deform_groups=2),
    dict(kernel_size=(3, 2), stride=(2, 1), padding=(2, 0), dilation=(2, 1), deform_groups=1),
]


@pytest.mark.parametrize("cls", [MDConv, DConv])
@pytest.mark.parametrize("config", CONFIGS)
def test_outside_fraction_is_where_the_kernel_reads_zero(cls, config):
    torch.manual_seed(SEED)
    groups = config["deform_groups"]
    layer = cls(2 * groups, 2, **config)
    with torch.no_grad():  # offsets of a few pixels, varying over the map; masks spread over (0, 1)
        layer.conv_offset.weight.normal_(0, 1.5)
        layer.conv_offset.bias.normal_(0, 1.0)
    x = torch.randn(2, 2 * groups, 5, 6)
    with torch.no_grad():
        offset, mask = layer.offset_and_mask(x)
    expected = _kernel_outside_fraction(layer, x.shape, offset, mask)
    stats = measure_deform_health(layer, x, forward=_forward)[""]
    assert 0.05 < expected < 0.95  # the case exercises both sides
    padding = _kernel_outside_fraction(layer, x.shape, torch.zeros_like(offset), None)
    assert stats["padding_fraction"] == pytest.approx(padding, abs=1e-12)
    assert stats["outside_fraction"] == pytest.approx(expected, abs=1e-12)
    lengths = offset.view(2, groups, -1, 2, *offset.shape[-2:]).double().pow(2).sum(3).sqrt()
    assert stats["median_offset_px"] == pytest.approx(lengths.flatten().median().item())


# (ho, wo, dy, dx) on a 4x4 map with a 1x1 kernel, no padding: output (ho, wo) samples (ho + dy, wo + dx).
BOUNDARY_POINTS = [
    (0, 0, -1.0, 0.0),  # y = -1 exactly
    (0, 1, -0.9999, 0.0),
    (0, 2, -1.0001, 0.0),
    (1, 0, 0.0, -1.0),  # x = -1 exactly
    (1, 1, 0.0, -1.9999),
    (1, 2, 0.0, 1.0),  # x = 3, the last column
    (1, 3, 0.0, 1.0),  # x = 4 = W exactly
    (2, 0, float("nan"), 0.0),
    (2, 1, 0.0, float("inf")),
    (2, 2, -float("inf"), 0.0),
    (2, 3, 0.0, 0.99999994),  # 3 + 0.99999994: 4.0 (outside) in float32, below 4 in float64
    (3, 0, 0.99999994, 0.0),
    (3, 1, -4.0, -2.0),  # the corner (-1, -1)
    (3, 2, -3.9999, -2.9999),  # just inside that corner
    (3, 3, 0.5, 0.5),
]


def test_points_on_and_near_the_boundary_fall_on_the_kernels_side():
    layer = DConv(1, 1, 1)
    expected = {}
    for dtype in (torch.float32, torch.float64):
        offset = torch.zeros(1, 2, 4, 4, dtype=dtype)
        for ho, wo, dy, dx in BOUNDARY_POINTS:
            offset[0, 0, ho, wo], offset[0, 1, ho, wo] = dy, dx
        layer.offset_and_mask = lambda x, offset=offset: (offset, None)
        expected[dtype] = _kernel_outside_fraction(layer, (1, 1, 4, 4), offset, None)
        stats = measure_deform_health(layer, torch.zeros(1, 1, 4, 4, dtype=dtype), forward=_forward)[""]
        assert stats["outside_fraction"] == pytest.approx(expected[dtype], abs=1e-12), dtype
    # the kernel rounds the position in the offset's precision: two points differ between the dtypes
    assert expected[torch.float32] - expected[torch.float64] == pytest.approx(2 / 16)


class _Backbone(nn.Module):
    """A plain module with an MDConv reached twice and a DConv never reached."""

    def __init__(self):
        super().__init__()
        self.dcn = MDConv(2, 2, 3, padding=1)
        self.unused = DConv(2, 2, 3, padding=1)
        self.bn = nn.BatchNorm2d(2)

    def forward(self, x):
        return self.dcn(self.bn(self.dcn(x)))


def test_modes_are_restored_hooks_removed_and_unreached_layers_left_out():
    model = _Backbone().train()
    model.bn.eval()  # a frozen norm layer inside a training model must stay frozen
    x = torch.randn(1, 2, 4, 4)
    result = measure_deform_health(model, x)  # no extract_feat: model(x)
    assert set(result) == {"dcn"} and result["dcn"]["calls"] == 2
    assert model.training and model.dcn.training and not model.bn.training
    assert not model.dcn._forward_pre_hooks
    assert result["dcn"]["outside_fraction"] == pytest.approx(44 / 144)


def test_hooks_and_modes_are_restored_when_the_forward_fails():
    model = _Backbone().train()

    def failing(m, inputs):
        m(inputs)
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        measure_deform_health(model, torch.randn(1, 2, 4, 4), forward=failing)
    assert model.training and not model.dcn._forward_pre_hooks


def test_extract_feat_is_the_default_forward():
    class Detector(nn.Module):
        def __init__(self):
            super().__init__()
            self.backbone = _Backbone()

        def extract_feat(self, x):
            return self.backbone(x)

        def forward(self, x):
            raise AssertionError("measure_deform_health must call extract_feat")

    result = measure_deform_health(Detector(), torch.randn(1, 2, 4, 4))
    assert set(result) == {"backbone.dcn"}


# ---- the hook, in a fake runner ----


class _Logger:
    def __init__(self):
        self.infos, self.warnings = [], []

    def info(self, message):
        self.infos.append(message)

    def warning(self, message):
        self.warnings.append(message)


class _Model(_Backbone):
    def data_preprocessor(self, batch, training):
        assert training is False
        return {"inputs": torch.stack(batch["inputs"]), "data_samples": batch["data_samples"]}


def _loop(num):
    samples = [{"inputs": torch.randn(2, 4, 4), "data_samples": i} for i in range(num)]
    return SimpleNamespace(dataloader=SimpleNamespace(dataset=samples))


def _runner(tmp_path, model, val=3, test=3, train=3, iteration=0):
    return SimpleNamespace(
        model=model,
        logger=_Logger(),
        work_dir=str(tmp_path),
        iter=iteration,
        val_loop=_loop(val) if val is not None else None,
        test_loop=_loop(test) if test is not None else None,
        train_loop=_loop(train),
    )


@pytest.mark.parametrize(
    "kwargs,argument",
    [
        (dict(interval=0), "interval"),
        (dict(interval=2.5), "interval"),
        (dict(num_images=0), "num_images"),
        (dict(outside_warning=1.5), "outside_warning"),
        (dict(outside_warning=-0.1), "outside_warning"),
        (dict(outside_warning=float("nan")), "outside_warning"),
    ],
)
def test_bad_arguments_name_the_argument(kwargs, argument):
    with pytest.raises(ValueError, match=rf"{argument} must be .*got"):
        DeformHealthHook(**kwargs)


@pytest.mark.parametrize("val,test,expected", [(3, 3, "val"), (None, 3, "test"), (None, 0, "train")])
def test_the_fixed_batch_comes_from_val_then_test_then_train(tmp_path, val, test, expected):
    hook = DeformHealthHook(interval=2, num_images=2)
    runner = _runner(tmp_path, _Model(), val=val, test=test)
    hook.before_train(runner)
    assert hook.source == expected and hook._batch["inputs"].shape == (2, 2, 4, 4)
    assert any(f"first 2 samples of the {expected} dataset" in line for line in runner.logger.infos)
    assert any("not reached by extract_feat" in line and "unused" in line for line in runner.logger.infos)


def test_the_hook_measures_at_the_interval_and_writes_json(tmp_path):
    hook = DeformHealthHook(interval=2, num_images=2, outside_warning=0.3)
    runner = _runner(tmp_path, _Model())
    hook.before_train(runner)
    for i in range(5):
        runner.iter = i
        hook.after_train_iter(runner, i)
    runner.iter = 5
    hook.after_train(runner)
    assert [r["iter"] for r in hook.history] == [0, 2, 4, 5] and hook.last is hook.history[-1]
    with open(tmp_path / "deform_health.json") as f:
        records = json.load(f)
    assert [r["iter"] for r in records] == [0, 2, 4, 5]
    assert records[0]["layers"]["dcn"]["outside_fraction"] == pytest.approx(44 / 144)
    assert [name for name in os.listdir(tmp_path)] == ["deform_health.json"]  # no temp file left
    # 44/144 = 0.306 > 0.3: one warning per measurement, naming the layer
    assert len(runner.logger.warnings) == 4 and all("dcn samples 30.6%" in w for w in runner.logger.warnings)
    assert sum("deform health @ iter" in line for line in runner.logger.infos) == 4

    runner.iter = 5  # one more iteration, at the interval: after_train does not measure it again
    hook.after_train_iter(runner, 5)
    runner.iter = 6
    hook.after_train(runner)
    assert [r["iter"] for r in hook.history] == [0, 2, 4, 5, 6]


def test_a_model_without_deformable_layers_is_logged_once_and_left_alone(tmp_path):
    model = nn.Sequential(nn.Conv2d(2, 2, 3, padding=1))
    hook = DeformHealthHook(interval=1)
    runner = _runner(tmp_path, model)
    hook.before_train(runner)
    hook.after_train_iter(runner, 0)
    hook.after_train(runner)
    assert runner.logger.infos == ["DeformHealthHook: the model has no MDConv/DConv layers; nothing to measure"]
    assert hook.history == [] and hook.last is None and os.listdir(tmp_path) == []


def test_a_resumed_run_keeps_the_earlier_records(tmp_path):
    earlier = [{"iter": 0, "layers": {}}, {"iter": 4, "layers": {}}, {"iter": 8, "layers": {}}]
    (tmp_path / "deform_health.json").write_text(json.dumps(earlier))
    hook = DeformHealthHook(interval=4, num_images=1)
    hook.before_train(_runner(tmp_path, _Model(), iteration=4))
    assert [r["iter"] for r in hook.history] == [0, 4]
    assert [r["iter"] for r in json.loads((tmp_path / "deform_health.json").read_text())] == [0, 4]


# ---- the hook in mmengine's Runner ----


def test_the_hook_in_the_runner_on_a_tiny_mdconv_detector(tmp_path):
    from mmengine.config import Config
    from mmengine.runner import Runner

    from mmdet_tiny import make_tiny_coco, tiny_options, write_config

    make_tiny_coco(str(tmp_path / "data"))  # 2 images: 2 iterations of batch 1
    cfg = Config.fromfile(
        write_config(str(tmp_path / "cfg.py"), "mmdet::dcnv2/faster-rcnn_r50-mdconv-c3-c5_fpn_1x_coco.py")
    )
    cfg.merge_from_dict(tiny_options(cfg, str(tmp_path / "data"), str(tmp_path / "work")))
    cfg.train_cfg.val_begin = 2  # keep the val dataloader (the hook's source) without running validation
    cfg.custom_hooks = [dict(type="DeformHealthHook", interval=1, num_images=2, outside_warning=0.5)]
    runner = Runner.from_cfg(cfg)
    runner.train()

    hook = next(h for h in runner.hooks if isinstance(h, DeformHealthHook))
    assert hook.source == "val" and [r["iter"] for r in hook.history] == [0, 1, 2]
    layers = hook.history[0]["layers"]
    assert len(layers) == 13  # MDConv in every 3x3 conv of c3-c5
    # 64x64 images: c5's later blocks work on 2x2 maps; with the zero-initialised offsets, 3x3 pad 1
    # puts 20 of 36 points (of 0.5 masks) on the padding ring
    for name in ("backbone.layer4.1.conv2", "backbone.layer4.2.conv2"):
        assert layers[name]["map_hw"] == (2, 2)
        assert layers[name]["outside_fraction"] == pytest.approx(20 / 36) == layers[name]["padding_fraction"]
        assert layers[name]["median_offset_px"] == 0.0 and layers[name]["mean_mask"] == pytest.approx(0.5)
    assert layers["backbone.layer2.0.conv2"]["map_hw"] == (16, 16)
    assert hook.history[-1]["layers"]["backbone.layer3.0.conv2"]["median_offset_px"] > 0  # it trained

    records = json.loads((tmp_path / "work" / "deform_health.json").read_text())
    assert [r["iter"] for r in records] == [0, 1, 2] and set(records[0]["layers"]) == set(layers)
    with open(os.path.join(runner.log_dir, f"{runner.timestamp}.log")) as log:
        text = log.read()
    assert "first 2 samples of the val dataset" in text
    assert "deform health @ iter 0: 13 layers" in text
    assert "backbone.layer4.1.conv2 samples 55.6% (mask-weighted) outside its 2x2 input map" in text
    assert "55.6% with zero offsets" in text and "WARNING" in text
