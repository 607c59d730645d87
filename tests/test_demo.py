"""The main job (python -m mmdet_dcnv2.tools.demo), very short: 2 iterations of each command the
Makefile runs (make demo, make demo-compare, make ablation) on a handful of generated images; paired
initial weights; reruns; and the refusals of bad input."""

import json
import os
import shutil
import subprocess
import sys

import pytest

pytest.importorskip("mmdet")
pytest.importorskip("matplotlib")
pytestmark = pytest.mark.usefixtures("pretrained_cache")  # tiny generated weights (conftest)

TINY_DATA = ["--num-train", "8", "--num-val", "4", "--num-test", "4", "--num-test-rigid", "4"]
TINY_RUN = ["--iters", "2", "--batch-size", "2", "--num-vis", "2", "--health-interval", "1"]
# The arms and seeds of the Makefile's targets (seeds cut to keep the test short).
DEMO = ["--models", "dcnv2"]
DEMO_COMPARE = ["--models", "regular", "dcnv2", "--seeds", "0", "1", "--jobs", "2"]
ABLATION = [
    "--models",
    "regular",
    "dcnv2",
    "dcnv1:0",
    "dcnv2_mdpool:0",
    "dcnv2_mdpool_mimic:0",
    "--seeds",
    "0",
    "1",
    "--jobs",
    "2",
]


def _demo(tmp_path, *args, work="work", data="data", timeout=600):
    cmd = [sys.executable, "-P", "-m", "mmdet_dcnv2.tools.demo", "--work-dir", str(tmp_path / work)]
    cmd += ["--data-root", str(tmp_path / data), *TINY_DATA, *TINY_RUN, *args]
    run = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=timeout)
    return run.returncode, run.stdout + run.stderr


def _metrics(tmp_path, arm, seed=0, work="work"):
    return json.loads((tmp_path / work / arm / f"seed{seed}" / "metrics.json").read_text())


def test_demo_writes_every_artefact(tmp_path):
    code, out = _demo(tmp_path, *DEMO)
    assert code == 0, out[-4000:]
    assert "shapes dataset: generated" in out and "sha256" in out and "verified" in out
    assert "loss_rpn_cls" in out and "Iter(train)" in out  # losses and progress shown as it goes
    assert "Average Precision" in out  # pycocotools' COCO evaluation ran
    assert "deform health @ iter 2" in out  # the health hook's log line
    run_dir = tmp_path / "work" / "dcnv2" / "seed0"
    metrics = _metrics(tmp_path, "dcnv2")
    assert metrics["iterations"] == 2 and metrics["train_images"] == 8
    assert metrics["deformable_layers"] == {"types": ["MDConv"], "count": 13}
    assert set(metrics["evaluation"]) == {"test", "test_rigid"}
    for split in ("test", "test_rigid"):
        evaluation = metrics["evaluation"][split]
        assert set(evaluation["bbox"]) >= {"bbox_mAP", "bbox_mAP_50", "bbox_mAP_s", "bbox_mAP_m", "bbox_mAP_l"}
        assert evaluation["images"] == 4 and evaluation["instances_by_area"]["all"] > 0
        assert 0 <= evaluation["recall_at_score_0.5"]["recall"] <= 1
        assert json.loads((run_dir / evaluation["detections_file"]).read_text()) is not None
    assert set(metrics["evaluation"]["test"]["bbox_per_class"]) == {"triangle", "star", "plus", "ell", "ring", "arrow"}
    health = metrics["deform_health"]
    assert health["iter"] == 2 and len(health["layers"]) == 13
    for layer in health["layers"].values():
        assert 0 <= layer["outside_fraction"] <= 1 and 0 < layer["mean_mask"] < 1
    assert len(json.loads((run_dir / "deform_health.json").read_text())) == 3  # iterations 0, 1, 2
    assert metrics["pretrained"]["sha256"] and metrics["initial_state"]["keys_not_shared"]
    assert all(".conv_offset." in k for k in metrics["initial_state"]["keys_not_shared"])
    assert "loss_rpn_cls" in (run_dir / "train.log").read_text()
    assert (run_dir / "loss_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(os.listdir(run_dir / "vis")) == ["000000.png", "000001.png"]
    assert (run_dir / "iter_2.pth").exists()
    summary = (tmp_path / "work" / "summary.md").read_text()
    assert "DCNv2 (mdconv c3-c5)" in summary and "Test split: 4 images" in summary

    # The same command again reuses the finished run (nothing retrained, nothing lost).
    code, out = _demo(tmp_path, *DEMO)
    assert code == 0 and "reusing the finished run" in out, out[-3000:]


def test_demo_compare_and_ablation_reuse_runs(tmp_path):
    code, out = _demo(tmp_path, *DEMO_COMPARE)
    assert code == 0, out[-4000:]
    assert out.count("started ") == 4 and "done" in out  # two child processes at a time
    summary = json.loads((tmp_path / "work" / "summary.json").read_text())
    comparison = summary["comparisons"]["dcnv2"]
    assert comparison["seeds"] == [0, 1]
    by_label = {m["label"]: m for m in comparison["metrics"]}
    assert set(by_label) >= {"test AP", "test recall@0.5", "geometry-off AP"}
    ap = by_label["test AP"]
    assert len(ap["a"]) == len(ap["b"]) == 2 and ap["combined_interval"] is not None
    assert "paired seeds 0, 1" in (tmp_path / "work" / "summary.md").read_text()
    stamp = os.path.getmtime(tmp_path / "work" / "dcnv2" / "seed1" / "metrics.json")

    code, out = _demo(tmp_path, *ABLATION)
    assert code == 0, out[-4000:]
    assert out.count("started ") == 7  # 4 reused, 3 trained (their children report the reuse)
    assert os.path.getmtime(tmp_path / "work" / "dcnv2" / "seed1" / "metrics.json") == stamp
    # 13 c3-c5 convs + one RoI pool per FPN level read by the RoI extractor (P2-P5).
    kinds = {
        "dcnv1": (["DConv", "DPool"], 17),
        "dcnv2_mdpool": (["MDConv", "MDPool"], 17),
        "dcnv2_mdpool_mimic": (["MDConv", "MDPool"], 17),
    }
    for arm, (types, count) in kinds.items():
        assert _metrics(tmp_path, arm)["deformable_layers"] == {"types": types, "count": count}
    summary = json.loads((tmp_path / "work" / "summary.json").read_text())
    assert set(summary["comparisons"]) == {"dcnv1", "dcnv2", "dcnv2_mdpool", "dcnv2_mdpool_mimic"}
    assert summary["comparisons"]["dcnv1"]["seeds"] == [0]


def test_arms_start_from_identical_shared_weights(tmp_path):
    """Pairing: after the Runner's initialisation and load_from, every parameter the regular model has
    is bitwise equal in each deformable arm; the offset convs start at zero."""
    import torch
    from mmengine.runner import Runner

    import mmdet_dcnv2  # noqa: F401
    from mmdet_dcnv2.benchmark import pretrained
    from mmdet_dcnv2.benchmark.run import RunOptions, build_config
    from mmdet_dcnv2.datasets import shapes
    from mmdet_dcnv2.tools.demo import prepare_initial_states

    data = str(tmp_path / "data")
    shapes.generate(data, {"train": 2, "val": 1, "test": 1, "test_rigid": 1})
    options = RunOptions(
        work_dir=str(tmp_path / "work"),
        data_root=data,
        pretrained=pretrained.verify(),
        data_checksums=shapes.read_meta(data)["checksums"],
        iters=2,
        batch_size=1,
    )
    prepare_initial_states([0], options)
    states = {}
    for arm in ("regular", "dcnv2", "dcnv1", "dcnv2_mdpool"):
        cfg = build_config(arm, 0, options)
        runner = Runner.from_cfg(cfg)
        runner._init_model_weights()
        runner.load_or_resume()
        states[arm] = {k: v.clone() for k, v in runner.model.state_dict().items()}
    regular = states["regular"]
    # The pretrained backbone really is in it (not mmdet's random init).
    cached = torch.load(pretrained.default_path(), weights_only=True)
    assert torch.equal(regular["backbone.layer3.0.conv2.weight"], cached["layer3.0.conv2.weight"].float())
    for arm in ("dcnv2", "dcnv1", "dcnv2_mdpool"):
        for key, value in regular.items():
            assert torch.equal(states[arm][key], value), (arm, key)
        offsets = [v for k, v in states[arm].items() if ".conv_offset." in k]
        assert len(offsets) == 26 and all(not v.any() for v in offsets)


def test_a_rerun_at_the_same_seed_and_threads_is_identical(tmp_path):
    code, out = _demo(tmp_path, *DEMO, "--eval-splits", "test", work="a")
    assert code == 0, out[-3000:]
    code, out = _demo(tmp_path, *DEMO, "--eval-splits", "test", work="b")
    assert code == 0, out[-3000:]
    a, b = _metrics(tmp_path, "dcnv2", work="a"), _metrics(tmp_path, "dcnv2", work="b")
    assert a["loss_curve"] == b["loss_curve"] and a["evaluation"]["test"]["bbox"] == b["evaluation"]["test"]["bbox"]
    assert (tmp_path / "a/dcnv2/seed0/iter_2.pth").exists()
    import torch

    sa = torch.load(tmp_path / "a/dcnv2/seed0/iter_2.pth", weights_only=False)["state_dict"]
    sb = torch.load(tmp_path / "b/dcnv2/seed0/iter_2.pth", weights_only=False)["state_dict"]
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


def test_bad_input_is_refused_with_a_message_and_nothing_overwritten(tmp_path):
    code, out = _demo(tmp_path, "--models", "dcnv3")
    assert code == 2 and "unknown model 'dcnv3'" in out and "dcnv2" in out
    code, out = _demo(tmp_path, "--models", "dcnv2:x")
    assert code == 2 and "seeds after ':' must be integers" in out

    # A damaged pretrained file: refused before anything runs.
    from mmdet_dcnv2.benchmark import pretrained

    bad = tmp_path / "weights" / "backbone.pth"
    bad.parent.mkdir()
    shutil.copy(pretrained.default_path(), bad)
    shutil.copy(pretrained.default_path()[: -len(".pth")] + ".json", bad.parent / "backbone.json")
    with open(bad, "r+b") as f:
        f.seek(2000)
        f.write(b"\xff\xfe")
    code, out = _demo(tmp_path, *DEMO, "--pretrained", str(bad))
    assert code == 2 and "sha256" in out and "changed or damaged" in out and not (tmp_path / "work").exists()

    # Data generated with other parameters, or damaged: refused, left as it is.
    from mmdet_dcnv2.datasets import shapes

    other = tmp_path / "data"
    shapes.generate(str(other), {"train": 3, "val": 4, "test": 4, "test_rigid": 4})
    code, out = _demo(tmp_path, *DEMO)
    assert code == 2 and "other parameters" in out and "counts" in out
    assert json.loads((other / "meta.json").read_text())["counts"]["train"] == 3

    # A work dir holding another run's results.
    code, out = _demo(tmp_path, *DEMO, data="fresh")
    assert code == 0, out[-3000:]
    before = (tmp_path / "work" / "dcnv2" / "seed0" / "metrics.json").read_text()
    code, out = _demo(tmp_path, *DEMO, "--batch-size", "1", data="fresh")
    assert code == 2 and "holds results of another run" in out and "Nothing was overwritten" in out
    assert (tmp_path / "work" / "dcnv2" / "seed0" / "metrics.json").read_text() == before


@pytest.mark.slow
def test_two_process_cpu_run_with_torchrun(tmp_path):
    """The README's distributed command: torchrun, 2 CPU processes (gloo), rank 0 writes the artefacts."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    cmd = [torchrun, "--nproc_per_node", "2", "--master_port", str(port), "-m", "mmdet_dcnv2.tools.demo"]
    cmd += ["--work-dir", str(tmp_path / "work"), "--data-root", str(tmp_path / "data"), *TINY_DATA, *TINY_RUN]
    env = dict(os.environ, PYTHONSAFEPATH="1")
    run = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, (run.stdout + run.stderr)[-4000:]
    metrics = _metrics(tmp_path, "dcnv2")
    assert metrics["world_size"] == 2 and metrics["iterations"] == 2 and metrics["train_images"] == 8
    assert metrics["deformable_layers"]["types"] == ["MDConv"]
    assert (tmp_path / "work" / "dcnv2" / "seed0" / "vis" / "000000.png").exists()


@pytest.mark.slow
def test_mim_train_and_test_find_the_shapes_configs(tmp_path):
    """`mim train/test mmdet_dcnv2 <shapes config>` from a directory with data/shapes, as the README says."""
    from mmdet_dcnv2.datasets import shapes

    mim = shutil.which("mim", path=os.path.dirname(sys.executable)) or shutil.which("mim")
    if mim is None:
        pytest.skip("openmim is not installed")
    shapes.generate(str(tmp_path / "data" / "shapes"), {"train": 4, "val": 2, "test": 2, "test_rigid": 2})
    short = ["train_cfg.max_iters=2", "train_cfg.val_interval=2", "default_hooks.checkpoint.interval=2"]
    for name in ("faster_rcnn_r50_fpn_shapes.py", "faster_rcnn_r50_fpn_mdconv_c3-c5_shapes.py"):
        work = tmp_path / name[:-3]
        run = subprocess.run(
            [mim, "train", "mmdet_dcnv2", name, "--gpus", "0", "--work-dir", str(work)]
            + ["--cfg-options", *short, "train_dataloader.batch_size=2"],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=300,
        )
        out = run.stdout + run.stderr
        assert run.returncode == 0, out[-4000:]
        assert "we find the config file in codebase mmdet_dcnv2" in out and "bbox_mAP_copypaste" in out
        assert "mmdet_dcnv2://pretrained/shapes_resnet50_w16.pth" in out  # the cached backbone, found
        test = subprocess.run(
            [mim, "test", "mmdet_dcnv2", name, "--gpus", "0", "--checkpoint", str(work / "iter_2.pth")]
            + ["--work-dir", str(work / "test")],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert test.returncode == 0, (test.stdout + test.stderr)[-4000:]
        assert "Epoch(test)" in test.stdout + test.stderr or "Iter(test)" in test.stdout + test.stderr
