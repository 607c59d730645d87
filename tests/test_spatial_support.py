"""Spatial-support analysis (mmdet_dcnv2.analysis, tools/spatial_support): the three views of the
DCNv2 paper's Sec. 2.1 on tiny detectors (narrow R-50, 90x90 images padded to 96).

- receptive field = autograd gradient, checked against central finite differences in float64;
- sampling locations: zero offsets give exactly a regular convolution's grid, and the reported
  points (with their modulations) reproduce what the layers computed, for MDConv and MDPool;
- saliency region: its response is within the bound, the next-smaller prefix is not;
- the command and the comparison tool run end to end and write their files; bad input fails clearly.
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

from mmengine.config import Config  # noqa: E402
from mmengine.registry import DefaultScope  # noqa: E402
from mmdet.registry import MODELS  # noqa: E402
from mmdet.utils import register_all_modules  # noqa: E402

from mmdet_tiny import tiny_model_options  # noqa: E402
from reference import _sample_roi_align, _sample_zero_border  # noqa: E402

from mmdet_dcnv2.analysis import (effective_receptive_field, effective_sampling_locations, load_detector,  # noqa: E402
                                  load_image, normalise, parse_spec, resolve_nodes, saliency_region)
from mmdet_dcnv2.analysis.nodes import last_c5_output  # noqa: E402
from mmdet_dcnv2.analysis.saliency import prefix_mask, rank_cells, relative_error  # noqa: E402
from mmdet_dcnv2.analysis.sampling_locations import conv_offsets_and_masks, roi_offsets_and_masks  # noqa: E402

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
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):  # mmdet's ResNet zero-inits each block's last BN
                module.weight.uniform_(0.5, 1.5)         # (zero_init_residual): the 3x3 convs would be cut off
                module.bias.uniform_(-0.2, 0.2)
            if hasattr(module, "conv_offset"):  # offsets of about a pixel, masks away from 0.5
                module.conv_offset.weight.normal_(0, 0.02)
                module.conv_offset.bias.normal_(0, 0.7)
            if hasattr(module, "offset_fc"):
                module.offset_fc[-1].weight.normal_(0, 0.05)
                module.mask_fc[2].bias.normal_(0, 1.0)
    checkpoint_path = osp.join(folder, "tiny.pth")
    torch.save({"state_dict": model.state_dict(), "meta": {"dataset_meta": {"classes": ("person", "car")}}},
               checkpoint_path)
    return config_path, checkpoint_path


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
    detectors = {"mdconv_mdpool": "faster_rcnn_r50_fpn_mdconv_c3-c5_mdpool_1x_coco.py",  # MDConv in c5, MDPool
                 "mdpool": "faster_rcnn_r50_fpn_mdpool_1x_coco.py"}  # regular convs in c5, MDPool
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
    assert field.gradient.shape == (node.response(model, normalise(model, image.pixels[None].double())).shape[1],
                                    3, IMAGE_SIZE, IMAGE_SIZE)
    torch.testing.assert_close(field.heat, field.gradient.square().sum((0, 1)).sqrt())

    # The strongest pixel and three others; central differences in raw 0-255 intensities.
    strongest = np.unravel_index(int(field.gradient.abs().sum(0).argmax()), field.gradient.shape[1:])
    pixels = [strongest, (0, 5, 7), (1, 44, 60), (2, 80, 31)]
    eps = 1e-3
    base = image.pixels[None].double()
    for c, y, x in pixels:
        plus, minus = base.clone(), base.clone()
        plus[0, c, y, x] += eps
        minus[0, c, y, x] -= eps
        with torch.no_grad():
            numeric = (node.response(model, normalise(model, plus))[0]
                       - node.response(model, normalise(model, minus))[0]) / (2 * eps)
        scale = float(field.gradient.abs().max())
        torch.testing.assert_close(field.gradient[:, c, y, x], numeric, rtol=1e-4, atol=1e-6 * scale)
    assert float(field.heat.max()) > 0


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
        assert torch.equal(deform.points, deform.feature_points * deform.input_stride)
    assert [layer.input_stride for layer in deform_layers] == [16, 32, 32]  # res5a samples c4 (stride 2)
    # The top layer feeds the node's own position only: its other points have no strength.
    top = deform_layers[-1].strength.view(deform_layers[-1].grid_shape)
    assert (top[..., node.row, node.col] > 0).all()
    top[..., node.row, node.col] = 0
    assert (top == 0).all()


def test_sampling_points_reproduce_what_the_deformable_layers_computed(deformable):
    """Bilinear samples at the reported points, times the reported modulations, give the layer output."""
    model, image = deformable
    calls = {}
    modules = dict(model.named_modules())
    for spec in ("conv:40,50", "cls:30,20,80,70"):
        node = _node(model, image, spec)
        hooks = [module.register_forward_hook(lambda m, a, o, name=name: calls.__setitem__(name, (a, o)))
                 for name, module in node.sampling_layers(model)]
        layers = effective_sampling_locations(model, image, node)
        for hook in hooks:
            hook.remove()
        assert layers and all(float(layer.strength.max()) > 0 for layer in layers)
        for layer in layers:
            module = modules[layer.name]
            (x, *rest), output = calls[layer.name]
            fx, fy = layer.feature_points.double().unbind(-1)
            with torch.no_grad():
                if layer.kind == "conv":
                    groups, taps, out_h, out_w = layer.grid_shape
                    assert groups == 1  # the R-50 config's deform_groups
                    _, mask = conv_offsets_and_masks(module, x)
                    samples = _sample_zero_border(x.double(), fy[None], fx[None])[0]  # (C, K*Ho*Wo)
                    samples = samples.view(-1, taps, out_h * out_w) * mask.double().view(1, taps, -1)
                    rebuilt = torch.einsum("ock,ckp->op", module.weight.double().flatten(2), samples)
                    assert module.bias is None  # ResNet's convs have none
                    torch.testing.assert_close(rebuilt.view(1, -1, out_h, out_w), output.double(),
                                               rtol=1e-4, atol=1e-4)
                else:
                    rois = rest[0]
                    assert type(module).__name__ == "MDPool"
                    _, mask = roi_offsets_and_masks(module, x, rois[:1], module.spatial_scale)
                    out_h, out_w, sy, sx = layer.grid_shape
                    samples = _sample_roi_align(x[int(rois[0, 0])].double(), fy, fx)
                    rebuilt = samples.view(-1, out_h, out_w, sy * sx).mean(-1) * mask.double()
                    torch.testing.assert_close(rebuilt, output[0].double(), rtol=1e-4, atol=1e-5)
                    # The bins tile the RoI (plus their small learned shifts): mean sample near its centre.
                    centre = layer.points.double().mean(0)
                    torch.testing.assert_close(centre, torch.tensor([54.5, 44.5], dtype=torch.float64),
                                               rtol=0, atol=3.0)


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
    assert region.forward_passes == len(region.probes) + 1 == sum(counted) + 1
    assert region.forward_passes <= 1 + 8 * 3  # 225 cells, batches of 8: at most 3 rounds
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


def _run(args, cwd):
    env = dict(os.environ, PYTHONSAFEPATH="1")
    return subprocess.run([sys.executable, "-P", "-m", *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=300)


def test_command_writes_every_view_of_the_default_nodes_and_compares(files, tmp_path):
    config, checkpoint = files["mdconv_mdpool"]
    run = _run(["mmdet_dcnv2.tools.spatial_support", config, checkpoint, files["image"], "--out-dir", "out",
                "--score-thr", "0", "--cell", "6"], tmp_path)
    assert run.returncode == 0, (run.stdout + run.stderr)[-4000:]
    assert "saliency search conv_x" in run.stderr and "img/s" in run.stderr  # the progress bar
    out = tmp_path / "out"
    summary = json.loads((out / "summary.json").read_text())
    names = [node["node"] for node in summary["nodes"]]
    assert names[0].startswith("conv_x") and names[1:] == ["cls_det0", "reg_det0"]
    assert summary["detections"] and summary["network_input_size"] == [IMAGE_SIZE, IMAGE_SIZE]
    for node in summary["nodes"]:
        assert node["saliency"]["error"] <= 0.1
        for view in ("receptive_field", "sampling_locations", "saliency"):
            assert (out / f"{node['node']}_{view}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        with np.load(out / f"{node['node']}.npz") as record:
            assert record["erf_heat"].shape == (IMAGE_SIZE, IMAGE_SIZE)
            assert record["saliency_keep"].dtype == bool
            assert len(record["sampling_names"]) == (3 if node["node"].startswith("conv") else 1)
            assert record["sampling_0_points"].shape[1] == 2

    compare = _run(["mmdet_dcnv2.tools.spatial_support_compare", str(out / f"{names[0]}.npz"),
                    str(out / f"{names[0]}.npz"), "--labels", "a", "b", "--colors", "64", "--out", "cmp.png"], tmp_path)
    assert compare.returncode == 0, compare.stderr[-4000:]
    assert (tmp_path / "cmp.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_command_rejects_bad_input_before_loading_the_model(files, tmp_path):
    config, checkpoint = files["mdconv_mdpool"]
    run = _run(["mmdet_dcnv2.tools.spatial_support", config, checkpoint, files["image"], "--nodes", "box:1,2"],
               tmp_path)
    assert run.returncode != 0 and "unknown node kind 'box'" in run.stderr
    run = _run(["mmdet_dcnv2.tools.spatial_support", config, checkpoint, "nope.png"], tmp_path)
    assert run.returncode != 0 and "image 'nope.png' does not exist" in run.stderr
