"""The backbone pretraining command and the checks on the weights the benchmark uses."""

import json
import subprocess
import sys

import pytest

pytest.importorskip("mmdet")


def test_pretraining_writes_weights_and_a_record_that_verify_accepts(tmp_path):
    import torch

    from mmdet_dcnv2.benchmark import pretrained

    out = tmp_path / "backbone.pth"
    cmd = [sys.executable, "-P", "-m", "mmdet_dcnv2.tools.pretrain_backbone", "--out", str(out)]
    cmd += ["--steps", "3", "--num-samples", "64", "--batch-size", "8", "--threads", "1"]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, (run.stdout + run.stderr)[-3000:]
    assert "step 3/3" in run.stdout and "ETA" in run.stdout and "held-out accuracy" in run.stdout
    record = pretrained.verify(str(out))
    assert record["steps"] == 3 and record["sha256"] == pretrained.sha256(str(out))
    state = torch.load(out, weights_only=True)
    # The detectors' backbone keys (mmdet's ResNet), no classifier head, float16 to stay small.
    assert "layer4.2.conv3.weight" in state and not any(k.startswith("fc") for k in state)
    assert state["conv1.weight"].dtype == torch.float16

    # The record must match the file: a changed record (or file) is refused, naming the problem.
    sidecar = tmp_path / "backbone.json"
    changed = dict(json.loads(sidecar.read_text()), sha256="0" * 64)
    sidecar.write_text(json.dumps(changed))
    with pytest.raises(pretrained.PretrainedError, match="changed or damaged"):
        pretrained.verify(str(out))
    sidecar.unlink()
    with pytest.raises(pretrained.PretrainedError, match="missing or unreadable"):
        pretrained.verify(str(out))
    with pytest.raises(pretrained.PretrainedError, match="not found"):
        pretrained.verify(str(tmp_path / "absent.pth"))


def test_cached_weights_verify_and_load_through_the_checkpoint_scheme(pretrained_cache):
    from mmengine.runner.checkpoint import CheckpointLoader

    import mmdet_dcnv2  # noqa: F401  (registers the scheme)
    from mmdet_dcnv2.benchmark import pretrained

    record = pretrained.verify()
    assert record["path"] == pretrained.default_path() == pretrained_cache
    state = CheckpointLoader.load_checkpoint("mmdet_dcnv2://pretrained/shapes_resnet50_w16.pth", map_location="cpu")
    assert "layer1.0.conv1.weight" in state
    with pytest.raises(pretrained.PretrainedError, match="expected mmdet_dcnv2://pretrained/"):
        CheckpointLoader.load_checkpoint("mmdet_dcnv2://../setup.py")


def test_bad_arguments_are_refused(tmp_path):
    cmd = [sys.executable, "-P", "-m", "mmdet_dcnv2.tools.pretrain_backbone"]
    run = subprocess.run([*cmd, "--out", str(tmp_path / "x.pt")], capture_output=True, text=True, timeout=120)
    assert run.returncode == 2 and "--out must name a .pth file" in run.stderr
    run = subprocess.run(
        [*cmd, "--out", str(tmp_path / "x.pth"), "--steps", "0"], capture_output=True, text=True, timeout=120
    )
    assert run.returncode == 2 and "steps must be a positive integer" in run.stderr
