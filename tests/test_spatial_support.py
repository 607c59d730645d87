"""Spatial-support analysis (mmdet_dcnv2.analysis, tools/spatial_support): the three views of the
DCNv2 paper's Sec. 2.1 on tiny detectors (narrow R-50, 90x90 images padded to 96).

- receptive field = autograd gradient, checked against central finite differences in float64;
- sampling locations: zero offsets give exactly a regular convolution's grid, centred on the node;
  the reported points (with their modulations) reproduce what the layers computed, and their
  strengths (and location strengths) are the gradients of the node w.r.t. trainable samples
  (locations) the layer's output is rebuilt from -- MDConv (1 and 4 deformable groups), MDPool
  (per level and shared across levels) and RoIAlign;
- nodes: the c5 stride comes from the architecture (input not a multiple of it), pixel -> unit ties
  go up, names carry the class / channel, duplicates are refused;
- saliency region: its response is within the bound, the next-smaller prefix is not;
- the command and the comparison tool run end to end and write their files; bad input fails clearly,
  before the model is loaded.
"""

import copy
import json
import os
import os.path as osp
import subprocess
import sys

import numpy as np
import pytest
import torch

pytest.importorskip("mmdet")
pytest.importorskip("matplotlib")

from mmdet.registry import MODELS  # noqa: E402
from mmdet.utils import register_all_modules  # noqa: E402
from mmengine.config import Config  # noqa: E402
from mmengine.registry import DefaultScope  # noqa: E402

import mmdet_dcnv2.analysis  # noqa: E402
from mmdet_dcnv2.analysis import (  # noqa: E402
    effective_receptive_field,
    effective_sampling_locations,
    load_detector,
    load_image,
    normalise,
    parse_spec,
    resolve_nodes,
    saliency_region,
)
from mmdet_dcnv2.analysis.nodes import last_c5_output  # noqa: E402
from mmdet_dcnv2.analysis.saliency import prefix_mask, rank_cells, relative_error  # noqa: E402
from mmdet_dcnv2.analysis.sampling_locations import conv_offsets_and_masks, roi_offsets_and_masks  # noqa: E402
from mmdet_tiny import tiny_model_options  # noqa: E402
from reference import _sample_roi_align, _sample_zero_border  # noqa: E402

CONFIGS = osp.join(osp.dirname(osp.abspath(__file__)), "..", "configs", "dcnv2")
IMAGE_SIZE = 90  # padded to 96 by the size divisor 32: c5 is 3x3
NO_DETECTIONS = (torch.zeros(0, 4), torch.zeros(0), torch.zeros(0, dtype=torch.long))


def _write_tiny_detector(folder, config_name, seed=0):
    """A tiny detector's config and a checkpoint with random, non-zero offsets (and pool offsets)."""
    cfg = Config.fromfile(osp.join(CONFIGS, config_name))
    cfg.merge_from_dict(tiny_model_options(cfg))
    cfg.model.roi_head.bbox_head.num_classes = 2
    pipeline = cfg.test_dataloader.dataset.pipeline
    next(step for step in pipeline if step["type"] == "Resize")["scale"] = (IMAGE_SIZE, IMAGE_SIZE)
    config_path = osp.join(folder, "tiny.py")
    cfg.dump(config_path)
    torch.manual_seed(seed)
    register_all_modules(init_default_scope=False)
    with DefaultScope.overwrite_default_scope("mmdet"):
        model = MODELS.build(cfg.model)
    model.init_weights()
    _randomise(model)
    checkpoint_path = osp.join(folder, "tiny.pth")
    torch.save(
        {"state_dict": model.state_dict(), "meta": {"dataset_meta": {"classes": ("person", "car")}}}, checkpoint_path
    )
    return config_path, checkpoint_path


def _randomise(model):
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):  # mmdet's ResNet zero-inits each block's last BN
                module.weight.uniform_(0.5, 1.5)  # (zero_init_residual): the 3x3 convs would be cut off
                module.bias.uniform_(-0.2, 0.2)
            if hasattr(module, "conv_offset"):  # offsets of about a pixel, masks away from 0.5
                module.conv_offset.weight.normal_(0, 0.02)
                module.conv_offset.bias.normal_(0, 0.7)
            if hasattr(module, "offset_fc"):
                module.offset_fc[-1].weight.normal_(0, 0.05)
                module.mask_fc[2].bias.normal_(0, 1.0)


def _write_image(path):
    import cv2

    # Two textured boxes on noise. No flat areas: there a max-pool window holds equal values, a tie
    # where the response is not differentiable and finite differences would not match any gradient.
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 255, (IMAGE_SIZE, IMAGE_SIZE, 3)).astype(np.int64)
    noise = rng.integers(-25, 25, (IMAGE_SIZE, IMAGE_SIZE, 3))
    pixels[10:45, 12:50] = np.array([40, 160, 220]) + noise[10:45, 12:50]
    pixels[50:85, 40:80] = np.array([200, 60, 90]) + noise[50:85, 40:80]
    cv2.imwrite(path, pixels.clip(0, 255).astype(np.uint8))
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("spatial_support")
    torch.set_num_threads(1)
    detectors = {
        "mdconv_mdpool": "faster_rcnn_r50_fpn_mdconv_c3-c5_mdpool_1x_coco.py",  # MDConv in c5, MDPool
        "mdpool": "faster_rcnn_r50_fpn_mdpool_1x_coco.py",  # regular convs in c5, MDPool
        "group4": "faster_rcnn_r50_fpn_mdconv_c3-c5_group4_1x_coco.py",  # 4 deformable groups, RoIAlign
        "roialign": "faster_rcnn_r50_fpn_mdconv_c3-c5_1x_coco.py",
    }  # MDConv in c5, RoIAlign
    files = {"image": _write_image(str(folder / "image.png"))}
    for key, config in detectors.items():
        os.makedirs(folder / key)
        files[key] = _write_tiny_detector(str(folder / key), config)
    return files


@pytest.fixture(scope="module")
def deformable(files):
    """mdconv in c3-c5 + MDPool, with the image as the detector sees it."""
    model = load_detector(*files["mdconv_mdpool"])
    return model, load_image(model, files["image"])


@pytest.fixture(scope="module")
def shared(files):
    """MDPool with share_roi_layer=True: one layer for all FPN levels (its fc branches randomised)."""
    model = load_detector(*files["mdpool"], cfg_options={"model.roi_head.bbox_roi_extractor.share_roi_layer": True})
    assert isinstance(model.roi_head.bbox_roi_extractor.shared_roi_layer, torch.nn.Module)
    _randomise(model.roi_head.bbox_roi_extractor)
    return model, load_image(model, files["image"])


def _node(model, image, spec):
    return resolve_nodes([spec], model, image, NO_DETECTIONS)[0]


def test_normalise_is_the_data_preprocessor(deformable):
    model, image = deformable
    assert image.size == (IMAGE_SIZE, IMAGE_SIZE)
    expected = model.data_preprocessor({"inputs": [image.pixels], "data_samples": None}, False)["inputs"]
    ours = normalise(model, image.pixels[None])
    assert ours.shape == (1, 3, 96, 96)
    torch.testing.assert_close(ours, expected)


def _active_channel(model, image, spec):
    """``conv:X,Y#active`` -> the c5 channel most active there (a random net has dead units)."""
    if not spec.endswith("#active"):
        return spec
    node = _node(model, image, spec.split("#")[0])
    with torch.no_grad():
        c5 = last_c5_output(model, normalise(model, image.pixels[None]))
    return spec.replace("active", str(int(c5[0, :, node.row, node.col].argmax())))


@pytest.mark.parametrize("spec", ["conv:45,40", "conv:20,70#active", "cls:10,8,52,47", "reg:38,48,82,88"])
def test_receptive_field_is_the_finite_difference_gradient(deformable, spec):
    model32, image = deformable
    node = _node(model32, image, _active_channel(model32, image, spec))
    model = copy.deepcopy(model32).double()
    field = effective_receptive_field(model, image, node)
    assert field.gradient.shape == (
        node.response(model, normalise(model, image.pixels[None].double())).shape[1],
        3,
        IMAGE_SIZE,
        IMAGE_SIZE,
    )

    # The strongest pixel and two others, all three colour channels; central differences in raw
    # 0-255 intensities. The heat map at a pixel is the norm of the numeric Jacobian there.
    strongest = np.unravel_index(int(field.gradient.abs().sum((0, 1)).argmax()), field.gradient.shape[2:])
    eps = 1e-3
    base = image.pixels[None].double()
    scale = float(field.gradient.abs().max())
    assert scale > 0
    for y, x in [strongest, (44, 60), (80, 31)]:
        jacobian = []
        for c in range(3):
            plus, minus = base.clone(), base.clone()
            plus[0, c, y, x] += eps
            minus[0, c, y, x] -= eps
            with torch.no_grad():
                jacobian.append(
                    (node.response(model, normalise(model, plus))[0] - node.response(model, normalise(model, minus))[0])
                    / (2 * eps)
                )
            torch.testing.assert_close(field.gradient[:, c, y, x], jacobian[-1], rtol=1e-4, atol=1e-6 * scale)
        torch.testing.assert_close(field.heat[y, x], torch.stack(jacobian).norm(), rtol=1e-4, atol=1e-6 * scale)


def _regular_grid(module, out_h, out_w):
    """The fixed sampling grid of a convolution, by explicit loops: (taps, out_h, out_w, (x, y))."""
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = module.kernel_size, module.stride, module.padding, module.dilation
    grid = torch.zeros(kh * kw, out_h, out_w, 2, dtype=torch.float64)
    for a in range(kh):
        for b in range(kw):
            for i in range(out_h):
                for j in range(out_w):
                    grid[a * kw + b, i, j] = torch.tensor([j * sw - pw + b * dw, i * sh - ph + a * dh])
    return grid


def test_zero_offsets_give_exactly_the_regular_grid_of_a_plain_convolution(deformable, files):
    model, image = deformable
    zeroed = copy.deepcopy(model)
    with torch.no_grad():
        for module in zeroed.backbone.layer4.modules():
            if hasattr(module, "conv_offset"):
                module.conv_offset.weight.zero_()
                module.conv_offset.bias.zero_()
    plain = load_detector(*files["mdpool"])  # regular nn.Conv2d in c5
    node = _node(zeroed, image, "conv:50,45")
    deform_layers = effective_sampling_locations(zeroed, image, node)
    plain_layers = effective_sampling_locations(plain, image, node)
    assert [layer.layer_type for layer in deform_layers] == ["MDConv"] * 3
    assert [layer.layer_type for layer in plain_layers] == ["Conv2d"] * 3
    assert [layer.name for layer in plain_layers] == [f"backbone.layer4.{i}.conv2" for i in range(3)]
    for deform, regular, module in zip(deform_layers, plain_layers, (b.conv2 for b in plain.backbone.layer4)):
        groups, taps, out_h, out_w = deform.grid_shape
        expected = _regular_grid(module, out_h, out_w).expand(groups, -1, -1, -1, -1).reshape(-1, 2)
        assert torch.equal(deform.feature_points.double(), expected)
        assert torch.equal(regular.feature_points.double(), expected)
    assert [layer.input_stride for layer in deform_layers] == [16, 32, 32]  # res5a samples c4 (stride 2)
    # In the image: each layer's centre tap of the node's own output lands on the node's pixel
    # (32 * col, 32 * row) = (64, 32), and the 3x3 taps around it are one input pixel apart -- 16 image
    # px for res5a (it reads c4), 32 for the two others.
    assert (node.col, node.row, node.x, node.y) == (2, 1, 64, 32)
    for layer, spacing in zip(deform_layers, (16, 32, 32)):
        groups, taps, out_h, out_w = layer.grid_shape
        at_node = layer.points.view(groups, taps, out_h, out_w, 2)[0, :, node.row, node.col]
        expected = torch.tensor(
            [[64 + dx, 32 + dy] for dy in (-spacing, 0, spacing) for dx in (-spacing, 0, spacing)], dtype=at_node.dtype
        )
        assert torch.equal(at_node, expected)
    # The top layer feeds the node's own position only: its other points have no strength.
    top = deform_layers[-1].strength.view(deform_layers[-1].grid_shape)
    assert (top[..., node.row, node.col] > 0).all()
    top[..., node.row, node.col] = 0
    assert (top == 0).all()


def _rebuild_from_samples(module, layer, x, rois, store):
    """The layer's output rebuilt from the reported points: trainable locations (leaves), the
    reference bilinear samples there (kept for their gradient) and the reported modulations."""
    fx = layer.feature_points.double().detach()[:, 0].clone().requires_grad_()
    fy = layer.feature_points.double().detach()[:, 1].clone().requires_grad_()
    x = x.double()
    if layer.kind == "conv":
        groups, taps, out_h, out_w = layer.grid_shape
        assert module.groups == 1 and module.bias is None  # ResNet's conv2
        _, mask = conv_offsets_and_masks(module, x)
        per_group = x.shape[1] // groups
        # Deformable group g samples its own channels at its own points (group-major layout).
        samples = torch.stack(
            [
                _sample_zero_border(
                    x[:, g * per_group : (g + 1) * per_group],
                    fy.view(groups, -1)[g][None],
                    fx.view(groups, -1)[g][None],
                )[0]
                for g in range(groups)
            ]
        ).view(groups, per_group, taps, out_h * out_w)
        weight = module.weight.double().view(-1, groups, per_group, taps)
        rebuilt = torch.einsum("ogck,gkp,gckp->op", weight, mask.double().view(groups, taps, -1), samples)
        rebuilt = rebuilt.view(1, -1, out_h, out_w)
        squared_axes = 1  # norm over a group's channels
    else:
        out_h, out_w, sy, sx = layer.grid_shape
        _, mask = roi_offsets_and_masks(module, x, rois[:1], 1 / layer.input_stride)
        samples = _sample_roi_align(x[int(rois[0, 0])], fy, fx)  # (C, points)
        rebuilt = (samples.view(-1, out_h, out_w, sy * sx).mean(-1) * mask.double())[None]
        squared_axes = 0
    store.update(samples=samples, fx=fx, fy=fy, axes=squared_axes)
    return rebuilt


@pytest.mark.parametrize(
    "model_key,spec",
    [
        ("mdconv_mdpool", "conv:40,50"),
        ("group4", "conv:60,30"),
        ("mdconv_mdpool", "reg:30,20,80,70"),
        ("roialign", "cls:30,20,80,70"),
        ("shared", "cls:30,20,80,70"),
    ],
)
def test_sampling_points_and_strengths_are_what_the_layers_computed(files, shared, model_key, spec):
    """Each layer's output, rebuilt from bilinear samples at the reported points times the reported
    modulations, is what the layer computed; and with the layer's output replaced by that rebuild
    (same value), autograd's gradient of the node w.r.t. the samples and w.r.t. the points'
    locations gives the reported strengths and location strengths."""
    if model_key == "shared":
        model32, image = shared
    else:
        model32 = load_detector(*files[model_key])
        image = load_image(model32, files["image"])
    model = copy.deepcopy(model32).double()
    node = _node(model, image, spec)
    layers = effective_sampling_locations(model, image, node)
    modules = dict(model.named_modules())
    expected_types = {"mdconv_mdpool": "MDConv", "group4": "MDConv", "roialign": "RoIAlign", "shared": "MDPool"}
    if node.kind == "conv":
        assert [layer.grid_shape[0] for layer in layers] == [4 if model_key == "group4" else 1] * 3
    else:
        expected_names = (
            ["roi_head.bbox_roi_extractor.shared_roi_layer"]
            if model_key == "shared"
            else ["roi_head.bbox_roi_extractor.roi_layers.0"]
        )  # a 50-px box: the stride-4 level
        assert [layer.name for layer in layers] == expected_names
        assert layers[0].input_stride == 4
        expected_types["mdconv_mdpool"] = "MDPool"
    assert {layer.layer_type for layer in layers} == {expected_types[model_key]}
    for layer in layers:
        module, store = modules[layer.name], {}

        def hook(m, args, output):
            rebuilt = _rebuild_from_samples(m, layer, args[0], args[1] if len(args) > 1 else None, store)
            torch.testing.assert_close(rebuilt, output, rtol=1e-9, atol=1e-9)
            return output + (rebuilt - rebuilt.detach())  # same value; gradient through the samples

        handle = module.register_forward_hook(hook)
        try:
            response = node.response(model, normalise(model, image.pixels[None].double()))[0]
            value_sq = location_sq = 0
            for j in range(response.numel()):
                g_samples, g_x, g_y = torch.autograd.grad(
                    response[j], [store["samples"], store["fx"], store["fy"]], retain_graph=True
                )
                value_sq = value_sq + g_samples.square().sum(store["axes"])
                location_sq = location_sq + g_x.square() + g_y.square()
        finally:
            handle.remove()
        strength, location = value_sq.sqrt().reshape(-1), location_sq.sqrt()
        assert float(strength.max()) > 0 and float(location.max()) > 0
        torch.testing.assert_close(layer.strength, strength, rtol=1e-7, atol=1e-12 * float(strength.max()))
        torch.testing.assert_close(layer.location_strength, location, rtol=1e-6, atol=1e-9 * float(location.max()))
    if node.kind != "conv":  # the bins tile the RoI (plus small learned shifts): mean sample near its centre
        torch.testing.assert_close(
            layers[0].points.mean(0), torch.tensor([54.5, 44.5], dtype=torch.float64), rtol=0, atol=3.0
        )


@pytest.mark.parametrize("spec,max_error", [("conv:45,40", 0.1), ("cls:10,8,52,47", 0.05), ("reg:38,48,82,88", 0.2)])
def test_saliency_region_meets_its_error_bound(deformable, spec, max_error):
    model, image = deformable
    node = _node(model, image, spec)
    field = effective_receptive_field(model, image, node)
    counted = []

    class Progress:
        def update(self, n):
            counted.append(n)

    region = saliency_region(model, image, node, field.heat, max_error, cell=6, batch_size=8, progress=Progress())
    order = rank_cells(field.heat, 6)
    assert region.num_cells == 15 * 15
    assert torch.equal(region.keep, prefix_mask(order, region.cells_kept, 6, image.size))

    def error_of(keep):
        with torch.no_grad():
            full = node.response(model, normalise(model, image.pixels[None]))[0].double()
            masked = node.response(model, normalise(model, image.pixels[None], keep))[0].double()
        return float(relative_error(masked, full))

    measured = error_of(region.keep)
    assert measured <= max_error and measured == pytest.approx(region.error, rel=1e-5, abs=1e-7)
    if region.cells_kept > 0:  # one cell fewer breaks the bound: the region is a minimal prefix
        assert error_of(prefix_mask(order, region.cells_kept - 1, 6, image.size)) > max_error
    assert region.masked_images == len(region.probes) == sum(counted) <= 8 * 3  # 225 cells, batches of 8
    assert region.forward_passes == 1 + len(counted) <= 1 + 3  # the full image, then at most 3 rounds
    torch.testing.assert_close(region.response, field.response.double())


def test_bad_node_specs_name_the_argument_and_what_was_expected(deformable):
    model, image = deformable
    with pytest.raises(ValueError, match="unknown node kind 'foo'.*conv, cls, reg"):
        parse_spec("foo:1,2")
    with pytest.raises(ValueError, match=r"position \(200, 10\) is outside the network-input image \(90x90"):
        _node(model, image, "conv:200,10")
    with pytest.raises(ValueError, match="channel 999 out of range; the c5 layer has 256"):
        _node(model, image, "conv:20,20#999")
    with pytest.raises(ValueError, match="expected det<N> or X1,Y1,X2,Y2"):
        _node(model, image, "cls:1,2,3")
    with pytest.raises(ValueError, match="X2 > X1"):
        _node(model, image, "reg:50,50,40,60")
    with pytest.raises(ValueError, match="found 0 detection.*det0 does not exist"):
        _node(model, image, "cls:det0")
    with pytest.raises(FileNotFoundError, match="image 'missing.png' does not exist"):
        load_image(model, "missing.png")


def test_conv_nodes_use_the_architectures_stride_and_round_ties_up(deformable):
    model, image = deformable
    model = copy.deepcopy(model)  # offsets zeroed: each tap sits on the regular grid
    with torch.no_grad():
        for module in model.backbone.layer4.modules():
            if hasattr(module, "conv_offset"):
                module.conv_offset.weight.zero_()
                module.conv_offset.bias.zero_()
    unpadded = copy.deepcopy(model)
    unpadded.data_preprocessor.pad_size_divisor = 1  # a 90x90 input: c5 is 3x3, 90 // 3 = 30 is not the stride
    assert normalise(unpadded, image.pixels[None]).shape[-2:] == (IMAGE_SIZE, IMAGE_SIZE)
    for detector in (model, unpadded):
        # Unit u is centred on pixel 32u; a position goes to the nearest centre, ties upwards.
        for (x, y), (col, row) in {(15, 47): (0, 1), (16, 48): (1, 2), (47.9, 0): (1, 0), (89, 89): (2, 2)}.items():
            node = _node(detector, image, f"conv:{x},{y}")
            assert (node.stride, node.col, node.row, node.x, node.y) == (32, col, row, 32 * col, 32 * row)
        layers = effective_sampling_locations(detector, image, _node(detector, image, "conv:64,64"))
        assert [layer.input_stride for layer in layers] == [16, 32, 32]
        assert layers[-1].points.view(9, 3, 3, 2)[4, 2, 2].tolist() == [64, 64]  # the centre tap on the node


def test_node_names_carry_class_and_channel_and_duplicates_are_refused(deformable):
    model, image = deformable
    nodes = resolve_nodes(
        ["cls:10,8,52,47#0", "cls:10,8,52,47#1", "reg:10,8,52,47#1", "conv:40,40", "conv:40,40#3"],
        model,
        image,
        NO_DETECTIONS,
    )
    assert [node.name for node in nodes] == [
        "cls_box_10_8_52_47_c0",
        "cls_box_10_8_52_47_c1",
        "reg_box_10_8_52_47_c1",
        "conv_x32_y32",
        "conv_x32_y32_ch3",
    ]
    with pytest.raises(
        ValueError,
        match=r"--nodes 'conv:40,40' and 'conv:45,40' both resolve to the same node "
        r"conv_x32_y32 .*give each node once",
    ):
        resolve_nodes(["conv:40,40", "conv:45,40"], model, image, NO_DETECTIONS)
    detections = (torch.tensor([[10.0, 8, 52, 47]]), torch.tensor([0.9]), torch.tensor([1]))
    with pytest.raises(ValueError, match="'cls:det0#1' and 'cls:det0' both resolve to the same node cls_det0_c1"):
        resolve_nodes(["cls:det0#1", "cls:det0"], model, image, detections)
    assert [n.name for n in resolve_nodes(["cls:det0#0", "cls:det0"], model, image, detections)] == [
        "cls_det0_c0",
        "cls_det0_c1",
    ]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_saliency_masks_follow_the_ranking_whatever_the_heat_maps_device():
    heat = torch.rand(10, 13, device="cuda")
    order = rank_cells(heat, 4)
    assert order.device.type == "cpu"
    torch.testing.assert_close(order, rank_cells(heat.cpu(), 4))
    assert prefix_mask(order, 5, 4, (10, 13)).sum() > 0


def _run(args, cwd):
    env = dict(os.environ, PYTHONSAFEPATH="1")
    return subprocess.run(
        [sys.executable, "-P", "-m", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300
    )


def test_command_writes_every_view_of_the_default_nodes_and_compares(files, tmp_path, capsys):
    from mmdet_dcnv2.tools import spatial_support_compare

    config, checkpoint = files["mdconv_mdpool"]
    run = _run(
        [
            "mmdet_dcnv2.tools.spatial_support",
            config,
            checkpoint,
            files["image"],
            "--out-dir",
            "out",
            "--score-thr",
            "0",
            "--cell",
            "6",
            "--threads",
            "1",
        ],
        tmp_path,
    )
    assert run.returncode == 0, (run.stdout + run.stderr)[-4000:]
    assert "saliency search conv_x" in run.stderr and "img/s" in run.stderr  # the progress bar
    out = tmp_path / "out"
    summary = json.loads((out / "summary.json").read_text())
    names = [node["node"] for node in summary["nodes"]]
    label = summary["detections"][0]["label"]
    assert names[0].startswith("conv_x") and names[1:] == [f"cls_det0_c{label}", f"reg_det0_c{label}"]
    assert summary["network_input_size"] == [IMAGE_SIZE, IMAGE_SIZE]
    for node in summary["nodes"]:
        saliency = node["saliency"]
        assert saliency["error"] <= 0.1
        # 225 cells, batches of 16: at most 2 rounds of at most 16 masked images, plus the full image.
        assert 1 <= saliency["masked_images"] <= 32 and 2 <= saliency["forward_passes"] <= 3
        assert f"{saliency['masked_images']} masked images in {saliency['forward_passes']} batched" in run.stdout
        for view in ("receptive_field", "sampling_locations", "saliency"):
            assert (out / f"{node['node']}_{view}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        with np.load(out / f"{node['node']}.npz") as record:
            assert record["erf_heat"].shape == (IMAGE_SIZE, IMAGE_SIZE)
            assert record["saliency_keep"].dtype == bool
            assert len(record["sampling_names"]) == (3 if node["node"].startswith("conv") else 1)
            assert record["sampling_0_points"].shape[1] == 2
            assert record["sampling_0_location_strength"].shape == record["sampling_0_strength"].shape

    capsys.readouterr()
    spatial_support_compare.main(
        [
            str(out / f"{names[0]}.npz"),
            str(out / f"{names[0]}.npz"),
            "--labels",
            "a",
            "b",
            "--colors",
            "64",
            "--out",
            str(tmp_path / "cmp.png"),
        ]
    )
    assert (tmp_path / "cmp.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "warning" not in capsys.readouterr().err
    spatial_support_compare.main(
        [str(out / f"{names[1]}.npz"), str(out / f"{names[2]}.npz"), "--out", str(tmp_path / "mixed.png")]
    )
    assert "warning: the records are not of the same node" in capsys.readouterr().err


def test_command_rejects_bad_input_before_loading_the_model(files, monkeypatch):
    from mmdet_dcnv2.tools import spatial_support

    def no_loading(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(mmdet_dcnv2.analysis, "load_detector", no_loading)
    config, checkpoint = files["mdconv_mdpool"]
    with pytest.raises(ValueError, match="unknown node kind 'box'"):
        spatial_support.main([config, checkpoint, files["image"], "--nodes", "conv:det0", "box:1,2"])
    with pytest.raises(FileNotFoundError, match="image 'nope.png' does not exist"):
        spatial_support.main([config, checkpoint, "nope.png"])
    with pytest.raises(AssertionError, match="the model was loaded"):  # good input does reach the loader
        spatial_support.main([config, checkpoint, files["image"], "--out-dir", "unused"])
