"""How users run it: mim train/test (with mmdet's package and ours), mmdet's tools, mim search,
init_detector and DetInferencer -- on CPU, tiny data, a couple of iterations each.

Runs against the installed package (a regular install: openmim looks for configs under
site-packages, which an editable install does not satisfy)."""

import glob
import os
import shutil
import subprocess
import sys

import pytest

mmdet = pytest.importorskip("mmdet")
pytest.importorskip("mim")

from mmengine.config import Config  # noqa: E402

import mmdet_dcnv2  # noqa: E402
from mmdet_tiny import OUR_CONFIGS, as_cfg_options, make_tiny_coco, tiny_options  # noqa: E402

MMDET_TOOLS = os.path.join(os.path.dirname(mmdet.__file__), ".mim", "tools")
MIM = shutil.which("mim", path=os.path.dirname(sys.executable)) or shutil.which("mim")
NAMES = sorted(os.path.basename(p)[:-3] for p in glob.glob(os.path.join(OUR_CONFIGS, "*.py")))


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    return make_tiny_coco(str(tmp_path_factory.mktemp("tiny_coco")))


def _options(name, data_root):
    cfg = Config.fromfile(os.path.join(OUR_CONFIGS, f"{name}.py"))
    return as_cfg_options(tiny_options(cfg, data_root))


def _run(cmd, cwd):
    run = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, f"{' '.join(cmd)}\n{run.stdout[-3000:]}\n{run.stderr[-3000:]}"
    return run.stdout + run.stderr


def test_configs_ship_in_the_installed_package():
    assert NAMES == sorted(
        [
            "faster_rcnn_r50_fpn_mdconv_c3-c5_1x_coco",
            "faster_rcnn_r50_fpn_mdconv_c3-c5_group4_1x_coco",
            "faster_rcnn_r50_fpn_mdpool_1x_coco",
            "mask_rcnn_r50_fpn_mdconv_c3-c5_1x_coco",
            "mask_rcnn_r50_fpn_fp16_mdconv_c3-c5_1x_coco",
            "faster_rcnn_r50_fpn_mdconv_c3-c5_mdpool_1x_coco",
            "mask_rcnn_r50_fpn_mdconv_c3-c5_mdpool_1x_coco",
            "faster_rcnn_r50_fpn_mdconv_c3-c5_mdpool_mimic_1x_coco",
            "mask_rcnn_r50_fpn_mdconv_c3-c5_mdpool_mimic_1x_coco",
            "faster_rcnn_r50_fpn_mimic_1x_coco",
        ]
    )
    assert os.path.exists(os.path.join(os.path.dirname(mmdet_dcnv2.__file__), ".mim", "tools", "train.py"))


def test_mim_search_lists_our_models(tmp_path):
    out = _run([MIM, "search", "mmdet_dcnv2"], tmp_path)
    for name in NAMES:
        assert name in out


def test_mim_train_mmdet_with_our_config_path(tmp_path, data_root):
    name = "faster_rcnn_r50_fpn_mdconv_c3-c5_1x_coco"
    out = _run(
        [
            MIM,
            "train",
            "mmdet",
            os.path.join(OUR_CONFIGS, f"{name}.py"),
            "--gpus",
            "0",
            "--work-dir",
            str(tmp_path / "work"),
        ]
        + _options(name, data_root),
        tmp_path,
    )
    assert "DCNv2 -> MDConv" in out  # custom_imports loaded the plugin, which said what it overrides
    assert os.path.exists(tmp_path / "work" / "epoch_1.pth")


@pytest.fixture(scope="module")
def paper_checkpoint(tmp_path_factory, data_root):
    """`mim train mmdet_dcnv2 NAME`: the config found by name inside our installed package."""
    tmp_path = tmp_path_factory.mktemp("mim_train_ours")
    name = "faster_rcnn_r50_fpn_mdconv_c3-c5_mdpool_1x_coco"
    out = _run(
        [MIM, "train", "mmdet_dcnv2", f"{name}.py", "--gpus", "0", "--work-dir", str(tmp_path / "work")]
        + _options(name, data_root),
        tmp_path,
    )
    assert "we find the config file in codebase mmdet_dcnv2" in out
    # The paper's 0.1x (of lr 0.02) reached our MDConv's offset convs, not MDPool's fc branches.
    assert "backbone.layer2.0.conv2.conv_offset.weight:lr=0.002" in out
    assert "offset_fc.0.weight:lr=0.002" not in out and "mask_fc.0.weight:lr=0.002" not in out
    return name, str(tmp_path / "work" / "epoch_1.pth")


def test_mim_train_ours_by_name(paper_checkpoint):
    assert os.path.exists(paper_checkpoint[1])


def test_mim_test_ours_by_name(tmp_path, data_root, paper_checkpoint):
    name, checkpoint = paper_checkpoint
    out = _run(
        [
            MIM,
            "test",
            "mmdet_dcnv2",
            f"{name}.py",
            "--checkpoint",
            checkpoint,
            "--gpus",
            "0",
            "--work-dir",
            str(tmp_path / "test"),
        ]
        + _options(name, data_root),
        tmp_path,
    )
    assert "Epoch(test)" in out


def test_mmdet_tools_train_and_test(tmp_path, data_root):
    name = "mask_rcnn_r50_fpn_mdconv_c3-c5_1x_coco"
    config = os.path.join(OUR_CONFIGS, f"{name}.py")
    work = str(tmp_path / "work")
    _run(
        [sys.executable, os.path.join(MMDET_TOOLS, "train.py"), config, "--work-dir", work] + _options(name, data_root),
        tmp_path,
    )
    out = _run(
        [
            sys.executable,
            os.path.join(MMDET_TOOLS, "test.py"),
            config,
            os.path.join(work, "epoch_1.pth"),
            "--work-dir",
            str(tmp_path / "test"),
        ]
        + _options(name, data_root),
        tmp_path,
    )
    assert "coco/segm_mAP" in out or "Epoch(test)" in out


def test_init_detector_and_det_inferencer(tmp_path, data_root, paper_checkpoint):
    from mmdet.apis import DetInferencer, inference_detector, init_detector

    name, checkpoint = paper_checkpoint
    cfg = Config.fromfile(os.path.join(OUR_CONFIGS, f"{name}.py"))
    cfg.merge_from_dict(tiny_options(cfg, data_root))
    image = glob.glob(os.path.join(data_root, "val2017", "*.png"))[0]
    model = init_detector(cfg, checkpoint, device="cpu")
    assert type(model.backbone.layer2[0].conv2).__name__ == "MDConv"
    result = inference_detector(model, image)
    assert result.pred_instances.bboxes.shape[1] == 4

    inferencer = DetInferencer(model=cfg, weights=checkpoint, device="cpu", show_progress=False)
    out = inferencer(image, out_dir=str(tmp_path / "vis"), no_save_vis=True)
    assert len(out["predictions"]) == 1 and "bboxes" in out["predictions"][0]
