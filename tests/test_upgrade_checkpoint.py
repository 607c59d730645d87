"""``python -m mmdet_dcnv2.tools.upgrade_checkpoint``: mmdet 1.x DCN offset keys renamed so the
checkpoint loads strictly into mmdet 3.x models; bad input refused with a message saying why."""

import collections
import os
import re
import subprocess
import sys

import pytest
import torch

pytest.importorskip("mmdet")

from mmdet.registry import MODELS  # noqa: E402
from mmengine.config import Config  # noqa: E402
from mmengine.runner import load_checkpoint, save_checkpoint  # noqa: E402

from mmdet_dcnv2.tools import upgrade_checkpoint  # noqa: E402
from mmdet_dcnv2.tools.upgrade_checkpoint import rename_dcn_offset_keys  # noqa: E402
from mmdet_tiny import tiny_model_options  # noqa: E402

MDCONV = "mmdet::dcnv2/faster-rcnn_r50-mdconv-c3-c5_fpn_1x_coco.py"


def _tiny_mdconv(tmp_path, seed):
    config = tmp_path / "mdconv.py"
    config.write_text(f"_base_ = {MDCONV!r}\n")
    cfg = Config.fromfile(str(config))
    cfg.merge_from_dict(tiny_model_options(cfg))
    model = MODELS.build(cfg.model).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # nothing left at its initial value: a swapped tensor would show
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen))
    return model


def _as_mmdet_1x(state_dict):
    """mmdet 1.x named a block's offset conv `conv2_offset`, beside `conv2`, with no version metadata."""
    return collections.OrderedDict(
        (key.replace("conv2.conv_offset.", "conv2_offset."), value) for key, value in state_dict.items()
    )


def _run(capsys, *args):
    """main()'s exit status, stdout and stderr."""
    capsys.readouterr()
    status = upgrade_checkpoint.main([str(a) for a in args])
    out, err = capsys.readouterr()
    return status, out, err


@pytest.mark.usefixtures("mmdet_scope")
def test_mmdet_1x_dcn_keys_load_strictly_after_the_upgrade(tmp_path, capsys):
    model = _tiny_mdconv(tmp_path, seed=3)
    legacy = _as_mmdet_1x(model.state_dict())
    renamed = [k for k in legacy if "conv2_offset." in k]
    assert len(renamed) == 2 * 13  # weight and bias of every DCN layer of R-50 c3-c5
    save_checkpoint({"state_dict": legacy, "meta": {"epoch": 12}}, str(tmp_path / "legacy.pth"))

    fresh = _tiny_mdconv(tmp_path, seed=4)
    with pytest.raises(RuntimeError, match="conv2_offset"):  # no hidden migration: it needs the command
        load_checkpoint(fresh, str(tmp_path / "legacy.pth"), strict=True)

    status, out, err = _run(capsys, tmp_path / "legacy.pth", tmp_path / "upgraded.pth")
    assert status == 0, err
    assert (
        "renamed 26 keys" in out
        and "backbone.layer2.0.conv2_offset.weight -> backbone.layer2.0.conv2.conv_offset.weight" in out
    )
    assert "upgrade_model_version.py" in out  # the reminder about mmdet's own converter

    load_checkpoint(fresh, str(tmp_path / "upgraded.pth"), strict=True)  # mmengine's loader
    for (key, expected), actual in zip(model.state_dict().items(), fresh.state_dict().values()):
        torch.testing.assert_close(actual, expected, msg=key)
    upgraded = torch.load(tmp_path / "upgraded.pth", weights_only=True)
    assert upgraded["meta"] == {"epoch": 12} and list(upgraded["state_dict"]) == list(model.state_dict())
    again = _tiny_mdconv(tmp_path, seed=5)
    again.load_state_dict(upgraded["state_dict"], strict=True)  # and torch's


def _layer_and_offset(prefix, kernel=3, offset_kernel=None):
    offset_kernel = offset_kernel or kernel
    return {
        f"{prefix}.weight": torch.randn(4, 4, kernel, kernel),
        f"{prefix}_offset.weight": torch.randn(27, 4, offset_kernel, offset_kernel),
        f"{prefix}_offset.bias": torch.randn(27),
    }


def test_only_offset_convs_beside_a_layer_of_their_kernel_are_renamed():
    state_dict = collections.OrderedDict(
        **_layer_and_offset("a.conv2"),
        **_layer_and_offset("b.conv2", offset_kernel=1),  # another kernel: not this layer's offset conv
        **{"c.thing_offset.weight": torch.randn(3, 3, 3, 3)},  # no layer beside it
        **_layer_and_offset("d.conv2"),
        **{"d.conv2.conv_offset.weight": torch.randn(27, 4, 3, 3)},
    )  # taken
    state_dict._metadata = {"a": {"version": 1}}
    upgraded, renames = rename_dcn_offset_keys(state_dict)
    assert renames == [
        ("a.conv2_offset.weight", "a.conv2.conv_offset.weight"),
        ("a.conv2_offset.bias", "a.conv2.conv_offset.bias"),
    ]
    assert list(upgraded)[:3] == ["a.conv2.weight", "a.conv2.conv_offset.weight", "a.conv2.conv_offset.bias"]
    assert list(upgraded)[3:] == list(state_dict)[3:]
    assert upgraded["a.conv2.conv_offset.weight"] is state_dict["a.conv2_offset.weight"]
    assert upgraded._metadata == state_dict._metadata


def test_a_bare_state_dict_is_upgraded_as_one(tmp_path, capsys):
    torch.save(_layer_and_offset("backbone.layer3.0.conv2"), tmp_path / "bare.pth")
    status, out, err = _run(capsys, tmp_path / "bare.pth", tmp_path / "out.pth")
    assert status == 0, err
    assert sorted(torch.load(tmp_path / "out.pth", weights_only=True)) == [
        "backbone.layer3.0.conv2.conv_offset.bias",
        "backbone.layer3.0.conv2.conv_offset.weight",
        "backbone.layer3.0.conv2.weight",
    ]


def _write(path, payload):
    if isinstance(payload, bytes):
        path.write_bytes(payload)
    else:
        torch.save(payload, path)
    return path


BAD_INPUT = [
    pytest.param(None, "does not exist", id="missing"),
    pytest.param(b"not a checkpoint at all", "is not a readable torch checkpoint", id="corrupt"),
    pytest.param(b"", "is not a readable torch checkpoint", id="empty"),
    pytest.param([1, 2, 3], "has no state dict", id="not-a-dict"),
    pytest.param({"meta": {}}, "has no state dict", id="no-state-dict"),
    pytest.param(
        {
            "state_dict": {
                "backbone.conv1.weight": torch.zeros(2, 3, 7, 7),
                "backbone.layer2.0.conv2.conv_offset.weight": torch.zeros(27, 2, 3, 3),
            }
        },
        "nothing to rename",
        id="already-upgraded",
    ),
    pytest.param(
        {
            "state_dict": dict(
                _layer_and_offset("backbone.layer2.0.conv2"),
                **{"rpn_head.rpn_conv.weight": torch.zeros(2, 2, 3, 3), "bbox_head.fc_cls.weight": torch.zeros(81, 2)},
            )
        },
        r"mmdet 1.x two-stage checkpoint \(bbox_head at the top level.*run mmdet's "
        r"tools/model_converters/upgrade_model_version.py",
        id="mmdet-converter-not-run",
    ),
]


@pytest.mark.parametrize("payload, message", BAD_INPUT)
def test_bad_input_is_refused_saying_why_and_nothing_is_written(tmp_path, capsys, payload, message):
    source = tmp_path / "in.pth"
    if payload is not None:
        _write(source, payload)
    status, out, err = _run(capsys, source, tmp_path / "out.pth")
    assert status == 1 and out == ""
    assert re.search(message, err), err
    assert os.listdir(tmp_path) == (["in.pth"] if payload is not None else [])  # no OUT, no temporary


def test_an_existing_output_is_kept_unless_forced(tmp_path, capsys):
    source = _write(tmp_path / "in.pth", {"state_dict": _layer_and_offset("layer1.0.conv2")})
    target = _write(tmp_path / "out.pth", b"precious")
    status, _, err = _run(capsys, source, target)
    assert status == 1 and "exists; pass --force" in err
    assert target.read_bytes() == b"precious"
    status, _, err = _run(capsys, source, target, "--force")
    assert status == 0, err
    assert "layer1.0.conv2.conv_offset.weight" in torch.load(target, weights_only=True)["state_dict"]


def test_runs_as_a_module(tmp_path):
    source = _write(tmp_path / "in.pth", {"state_dict": _layer_and_offset("layer1.0.conv2")})
    run = subprocess.run(
        [sys.executable, "-P", "-m", "mmdet_dcnv2.tools.upgrade_checkpoint", str(source), str(tmp_path / "out.pth")],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )
    assert run.returncode == 0, run.stderr
    assert "renamed 2 keys" in run.stdout and (tmp_path / "out.pth").exists()


class Arbitrary:
    """Not on torch's weights_only allow-list."""


def test_a_checkpoint_with_arbitrary_objects_is_refused_not_loaded(tmp_path, capsys):
    source = _write(tmp_path / "in.pth", {"state_dict": _layer_and_offset("layer1.0.conv2"), "extra": Arbitrary()})
    status, _, err = _run(capsys, source, tmp_path / "out.pth")
    assert status == 1 and "refuses (Unsupported global" in err and "Arbitrary" in err
    assert not (tmp_path / "out.pth").exists()
