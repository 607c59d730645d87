"""python -m mmdet_dcnv2.tools.export_onnx on a tiny DCNv2 Faster R-CNN (tests/mmdet_tiny.py): the
backbone+neck exports and checks itself in ONNX Runtime; the whole detector, corrupt and mismatched
checkpoints are refused before anything is written."""

import os

import pytest
import torch

from mmdet_dcnv2.tools import export_onnx
from mmdet_tiny import tiny_config

CONFIG = "faster_rcnn_r50_fpn_mdconv_c3-c5_1x_coco"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny DCNv2 config file and a checkpoint of its (untrained) model."""
    root = tmp_path_factory.mktemp("export_onnx")
    config = str(root / f"{CONFIG}_tiny.py")
    tiny_config(CONFIG).dump(config)
    model, _ = export_onnx.build_model(config)
    with torch.no_grad():  # offsets and masks away from their zero init, so DeformConv really deforms
        for name, parameter in model.named_parameters():
            if "conv_offset" in name:
                parameter.normal_(std=0.05 if name.endswith("weight") else 0.5)
    checkpoint = str(root / "tiny.pth")
    torch.save({"state_dict": model.state_dict(), "meta": {}}, checkpoint)
    return config, checkpoint, model.state_dict(), root


def _args(config, checkpoint, out, *extra):
    return [config, checkpoint, "--out", str(out), "--shape", "64", "96", "--runs", "1", *extra]


def test_backbone_neck_exports_and_matches_pytorch(tiny):
    config, checkpoint, _, root = tiny
    out = root / "tiny.onnx"
    result = export_onnx.main(_args(config, checkpoint, out))
    assert out.is_file()
    assert result["operators"]["DeformConv"] == 4 + 6 + 3  # conv2 of every c3-c5 Bottleneck of the R-50
    assert result["max_abs_diff"] <= 1e-4 * max(result["max_abs_output"], 1.0)
    assert result["torch_s"] > 0 and result["ort_s"] > 0

    # The same file at another size and batch: its inputs are dynamic.
    from mmdet_dcnv2.onnx import flat_outputs, max_abs_diff, ort_session, run_ort

    model, _ = export_onnx.build_model(config)
    export_onnx.load_checkpoint_strictly(model, checkpoint)
    part = export_onnx.BackboneNeck.wrap(model)
    x = torch.randn(2, 3, 96, 32)
    with torch.no_grad():
        expected = flat_outputs(part(x))
    assert max_abs_diff(expected, run_ort(ort_session(str(out)), [x])) <= 1e-4 * max(
        float(t.abs().max()) for t in expected
    )


def test_detector_part_is_refused_naming_what_blocks_it(tiny, capsys):
    config, checkpoint, _, root = tiny
    out = root / "detector.onnx"
    with pytest.raises(SystemExit, match=r"--part detector is not supported") as error:
        export_onnx.main(_args(config, checkpoint, out, "--part", "detector"))
    message = str(error.value)
    for blocker in ("mmcv.ops.roi_align.RoIAlign", "bbox_roi_extractor", "test_cfg.rpn.nms", "test_cfg.rcnn.nms"):
        assert blocker in message
    assert not out.exists()


def test_corrupt_checkpoint_is_refused_before_export(tiny):
    config, _, _, root = tiny
    corrupt = root / "corrupt.pth"
    corrupt.write_bytes(b"PK\x03\x04 not a checkpoint")
    out = root / "corrupt.onnx"
    with pytest.raises(SystemExit, match="does not fit the config's model, nothing exported"):
        export_onnx.main(_args(config, str(corrupt), out))
    assert not out.exists()


@pytest.mark.parametrize("change", ["missing", "shape"])
def test_mismatched_checkpoint_is_refused_before_export(tiny, change):
    config, _, state_dict, root = tiny
    state = dict(state_dict)
    key = "backbone.layer3.0.conv2.conv_offset.weight"
    if change == "missing":
        del state[key]
    else:
        state[key] = torch.zeros(3, *state[key].shape[1:])
    checkpoint = root / f"{change}.pth"
    torch.save({"state_dict": state}, checkpoint)
    out = root / f"{change}.onnx"
    with pytest.raises(SystemExit, match=key.replace(".", r"\.")):
        export_onnx.main(_args(config, str(checkpoint), out))
    assert not out.exists()


def test_missing_files_are_named(tmp_path):
    with pytest.raises(SystemExit, match="config 'nope.py' does not exist"):
        export_onnx.main(["nope.py", "x.pth", "--out", str(tmp_path / "m.onnx")])
    assert not os.listdir(tmp_path)
