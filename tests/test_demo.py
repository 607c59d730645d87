"""The main job (python -m mmdet_dcnv2.tools.demo), very short: a few iterations of both models on a
handful of generated images; every artefact is written and the summary compares the two."""

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("mmdet")
pytest.importorskip("matplotlib")


def test_short_run_writes_every_artefact(tmp_path):
    work, data = tmp_path / "work", tmp_path / "data"
    cmd = [
        sys.executable,
        "-P",
        "-m",
        "mmdet_dcnv2.tools.demo",
        "--work-dir",
        str(work),
        "--data-root",
        str(data),
        "--num-train",
        "4",
        "--num-val",
        "2",
        "--epochs",
        "1",
        "--batch-size",
        "2",
        "--num-vis",
        "2",
        "--baseline",
        "--cfg-options",
        "default_hooks.logger.interval=1",
    ]
    run = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    out = run.stdout + run.stderr
    assert run.returncode == 0, out[-4000:]
    assert "shapes dataset: generated" in out
    assert "loss_rpn_cls" in out and "Epoch(train)" in out  # losses and progress shown as it goes
    assert "Average Precision" in out  # pycocotools' COCO evaluation ran

    for model, kinds, count in (("dcnv2", ["MDConv"], 13), ("baseline", [], 0)):
        run_dir = work / model / "seed0"
        metrics = json.loads((run_dir / "metrics.json").read_text())
        assert metrics["iterations"] == 2 and metrics["train_images"] == 4 and metrics["val_images"] == 2
        assert metrics["deformable_layers"] == {"types": kinds, "count": count}
        assert set(metrics["bbox"]) >= {"bbox_mAP", "bbox_mAP_50", "bbox_mAP_75"}
        assert set(metrics["bbox_per_class"]) == {"triangle", "star", "plus", "ell", "ring", "arrow"}
        assert len(metrics["loss_curve"]) == 2
        assert "loss_rpn_cls" in (run_dir / "train.log").read_text()
        assert (run_dir / "loss_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        vis = sorted(os.listdir(run_dir / "vis"))
        assert vis == ["000000.png", "000001.png"]
        assert (run_dir / "epoch_1.pth").exists()

    summary = json.loads((work / "summary.json").read_text())["summary"]
    assert set(summary) == {"dcnv2", "baseline"}
    table = (work / "summary.txt").read_text()
    assert "dcnv2" in table and "baseline" in table and "DCNv2 - baseline" in table
    assert (work / "loss_curves.png").exists()

    # The data is generated once: the driver reuses a directory that is_generated() accepts.
    from mmdet_dcnv2.datasets import shapes

    assert shapes.is_generated(str(data), num_train=4, num_val=2)


def _free_port():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_process_cpu_run_with_torchrun(tmp_path):
    """The README's distributed command: torchrun, 2 CPU processes (gloo), rank 0 writes the artefacts."""
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    cmd = [
        torchrun,
        "--nproc_per_node",
        "2",
        "--master_port",
        str(_free_port()),
        "-m",
        "mmdet_dcnv2.tools.demo",
        "--work-dir",
        str(tmp_path / "work"),
        "--data-root",
        str(tmp_path / "data"),
        "--num-train",
        "8",
        "--num-val",
        "2",
        "--epochs",
        "1",
        "--batch-size",
        "2",
        "--num-vis",
        "1",
    ]
    env = dict(os.environ, PYTHONSAFEPATH="1")
    run = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, (run.stdout + run.stderr)[-4000:]
    metrics = json.loads((tmp_path / "work" / "dcnv2" / "seed0" / "metrics.json").read_text())
    # 8 images over 2 ranks with batch 2: 2 iterations.
    assert metrics["world_size"] == 2 and metrics["iterations"] == 2 and metrics["train_images"] == 8
    assert metrics["deformable_layers"]["types"] == ["MDConv"]
    assert (tmp_path / "work" / "dcnv2" / "seed0" / "vis" / "000000.png").exists()


@pytest.mark.slow
def test_mim_train_and_test_find_the_shapes_configs(tmp_path):
    """`mim train/test mmdet_dcnv2 <shapes config>` from a directory with data/shapes, as the README says."""
    import shutil

    from mmdet_dcnv2.datasets import shapes

    mim = shutil.which("mim", path=os.path.dirname(sys.executable)) or shutil.which("mim")
    if mim is None:
        pytest.skip("openmim is not installed")
    shapes.generate(str(tmp_path / "data" / "shapes"), num_train=4, num_val=2)
    for name in ("faster_rcnn_r50_fpn_shapes.py", "faster_rcnn_r50_fpn_mdconv_c3-c5_shapes.py"):
        work = tmp_path / name[:-3]
        run = subprocess.run(
            [
                mim,
                "train",
                "mmdet_dcnv2",
                name,
                "--gpus",
                "0",
                "--work-dir",
                str(work),
                "--cfg-options",
                "train_cfg.max_epochs=1",
                "train_dataloader.batch_size=2",
            ],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=300,
        )
        out = run.stdout + run.stderr
        assert run.returncode == 0, out[-4000:]
        assert "we find the config file in codebase mmdet_dcnv2" in out and "bbox_mAP_copypaste" in out
        test = subprocess.run(
            [
                mim,
                "test",
                "mmdet_dcnv2",
                name,
                "--gpus",
                "0",
                "--checkpoint",
                str(work / "epoch_1.pth"),
                "--work-dir",
                str(work / "test"),
            ],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert test.returncode == 0, (test.stdout + test.stderr)[-4000:]
        assert "Epoch(test)" in test.stdout + test.stderr
