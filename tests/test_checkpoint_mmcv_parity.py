"""Checkpoints cross between mmcv's modules and ours: strict loads both ways, equal outputs for the
convolution configs (mmcv has no CPU deform RoI pool: mdpool is checked on keys and shapes), and
mmdet 1.x checkpoints with sibling offset keys load through mmengine's loader."""

import collections
import json
import os
import subprocess
import sys

import pytest
import torch

mmdet = pytest.importorskip("mmdet")
pytest.importorskip("mmcv.ops")

from mmengine.runner import load_checkpoint, save_checkpoint  # noqa: E402

from mmdet_tiny import write_config  # noqa: E402

from mmdet_dcnv2.models import MDConv, MDPool  # noqa: E402

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
STOCK = {  # name: (mmdet config, compare outputs)
    "mdconv": ("mmdet::dcnv2/faster-rcnn_r50-mdconv-c3-c5_fpn_1x_coco.py", True),
    "group4": ("mmdet::dcnv2/faster-rcnn_r50-mdconv-group4-c3-c5_fpn_1x_coco.py", True),
    "mask_mdconv": ("mmdet::dcnv2/mask-rcnn_r50-mdconv-c3-c5_fpn_1x_coco.py", True),
    "mdpool": ("mmdet::dcnv2/faster-rcnn_r50_fpn_mdpool_1x_coco.py", False),
}

# Shared by both sides: the tiny model of a stock config, weights perturbed so the offsets are a
# fraction of a pixel to a few pixels (zero-initialised offset convs would make the check vacuous),
# and the backbone + neck + RPN outputs on a fixed image.
COMMON = r"""
import torch
from mmdet.registry import MODELS
from mmengine.config import Config
from mmdet_tiny import tiny_model_options

def build(config_path):
    cfg = Config.fromfile(config_path)
    cfg.merge_from_dict(tiny_model_options(cfg))
    return MODELS.build(cfg.model).eval()

def perturb(model, seed):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            scale = 0.05 if 'conv_offset' in name else 0.02
            p.add_(torch.randn(p.shape, generator=gen) * scale)

def outputs(model):
    image = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        feats = model.extract_feat(image)
        cls_scores, bbox_preds = model.rpn_head(feats)
    return list(feats) + list(cls_scores) + list(bbox_preds)
"""

MMCV_SIDE = COMMON + r"""
import json, sys
from mmdet.utils import register_all_modules
from mmengine.runner import load_checkpoint, save_checkpoint
register_all_modules(init_default_scope=True)
jobs = json.loads(sys.argv[1])
report = {}
for name, job in jobs.items():
    model = build(job['stock_config'])
    kinds = sorted({type(m).__module__ + '.' + type(m).__name__ for m in model.modules() if 'Deform' in type(m).__name__})
    load_checkpoint(model, job['ours_checkpoint'], strict=True)  # raises on missing/unexpected keys
    report[name] = {'kinds': kinds}
    if job['compare']:
        theirs, ours = outputs(model), torch.load(job['ours_outputs'])
        report[name]['max_diff'] = max(float((a - b).abs().max()) for a, b in zip(theirs, ours))
    perturb(model, seed=2)
    save_checkpoint({'state_dict': model.state_dict(), 'meta': {}}, job['mmcv_checkpoint'])
    torch.save(outputs(model), job['mmcv_outputs'])
assert 'mmdet_dcnv2' not in sys.modules, 'the mmcv side must not load the plugin'
print(json.dumps(report))
"""

exec(COMMON)  # build, perturb, outputs for our side (the same code the subprocess runs)


pytestmark = pytest.mark.usefixtures("mmdet_scope")


def test_checkpoints_cross_between_mmcv_and_ours(tmp_path):
    jobs, ours_models = {}, {}
    for name, (stock, compare) in STOCK.items():
        config = write_config(str(tmp_path / f"{name}.py"), stock)  # with custom_imports: our layers
        model = build(config)
        assert any(isinstance(m, (MDConv, MDPool)) for m in model.modules())
        perturb(model, seed=1)
        job = {key: str(tmp_path / f"{name}_{key}") for key in
               ("ours_checkpoint", "ours_outputs", "mmcv_checkpoint", "mmcv_outputs")}
        save_checkpoint({"state_dict": model.state_dict(), "meta": {}}, job["ours_checkpoint"])
        torch.save(outputs(model), job["ours_outputs"])
        # The mmcv side reads the stock file itself, with no custom_imports: mmcv's layers.
        plain = tmp_path / f"{name}_plain.py"
        plain.write_text(f"_base_ = {stock!r}\n")
        jobs[name] = dict(job, stock_config=str(plain), compare=compare)
        ours_models[name] = config

    env = dict(os.environ, PYTHONPATH=os.pathsep.join([TESTS_DIR, os.environ.get("PYTHONPATH", "")]))
    run = subprocess.run([sys.executable, "-c", MMCV_SIDE, json.dumps(jobs)], capture_output=True, text=True,
                         env=env, cwd=tmp_path, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads(run.stdout.strip().splitlines()[-1])

    for name, (stock, compare) in STOCK.items():
        expected_kind = "ModulatedDeformRoIPoolPack" if name == "mdpool" else "ModulatedDeformConv2dPack"
        assert all(k.startswith("mmcv.ops.") for k in report[name]["kinds"]), report[name]
        assert any(k.endswith(expected_kind) for k in report[name]["kinds"])
        if compare:  # ours -> mmcv: same outputs
            assert report[name]["max_diff"] < 1e-4, (name, report[name])
        # mmcv -> ours: strict, and the same outputs
        model = build(ours_models[name])
        load_checkpoint(model, jobs[name]["mmcv_checkpoint"], strict=True)
        if compare:
            for ours, theirs in zip(outputs(model), torch.load(jobs[name]["mmcv_outputs"])):
                torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)


def test_mmdet_1x_checkpoint_with_sibling_offset_keys_loads(tmp_path):
    """mmdet 1.x named a block's offset conv `conv2_offset`, beside `conv2`, with no version metadata."""
    model = build(write_config(str(tmp_path / "mdconv.py"), STOCK["mdconv"][0]))
    perturb(model, seed=3)
    legacy = collections.OrderedDict(
        (key.replace("conv2.conv_offset.", "conv2_offset."), value) for key, value in model.state_dict().items())
    renamed = [k for k in legacy if "conv2_offset." in k]
    assert len(renamed) == 2 * 13  # weight and bias of every DCN layer of R-50 c3-c5
    save_checkpoint({"state_dict": legacy}, str(tmp_path / "legacy.pth"))

    fresh = build(write_config(str(tmp_path / "mdconv2.py"), STOCK["mdconv"][0]))
    load_checkpoint(fresh, str(tmp_path / "legacy.pth"), strict=True)  # mmengine's loader
    for (key, expected), actual in zip(model.state_dict().items(), fresh.state_dict().values()):
        torch.testing.assert_close(actual, expected, msg=key)

    again = build(write_config(str(tmp_path / "mdconv3.py"), STOCK["mdconv"][0]))
    again.load_state_dict(legacy, strict=True)  # and torch's
    torch.testing.assert_close(again.backbone.layer3[0].conv2.conv_offset.weight,
                               model.backbone.layer3[0].conv2.conv_offset.weight)
