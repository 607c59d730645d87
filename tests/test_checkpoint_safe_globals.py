"""mmengine-written checkpoints (message hub, numpy scalars in meta) load under torch's default
weights_only=True once mmdet_dcnv2 is imported: torch.load, the Runner's load_from= and resume."""

import contextlib
import pickle

import numpy as np
import pytest
import torch

pytest.importorskip("mmdet")

from mmengine.config import Config  # noqa: E402
from mmengine.runner import Runner  # noqa: E402

from mmdet_dcnv2 import checkpoint as safe_checkpoint  # noqa: E402
from mmdet_tiny import make_tiny_coco, tiny_options, write_config  # noqa: E402

NUMPY_META = dict(
    best_score=np.float64(0.25), best_iter=np.int64(2), scale=np.float32(1.5), flag=np.bool_(True), count=np.int32(7)
)


@contextlib.contextmanager
def _without_our_allow_list():
    safe_checkpoint.disallow_mmengine_checkpoints()
    try:
        yield
    finally:
        safe_checkpoint.allow_mmengine_checkpoints()


def _runner(tmp_path, work_dir, **overrides):
    cfg = Config.fromfile(
        write_config(str(tmp_path / "cfg.py"), "mmdet::dcnv2/faster-rcnn_r50-mdconv-c3-c5_fpn_1x_coco.py")
    )
    cfg.merge_from_dict(tiny_options(cfg, str(tmp_path / "data"), str(tmp_path / work_dir)))
    cfg.merge_from_dict(overrides)
    cfg.val_cfg = cfg.val_dataloader = cfg.val_evaluator = None
    return Runner.from_cfg(cfg)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("safe_globals")
    make_tiny_coco(str(tmp_path / "data"))
    runner = _runner(tmp_path, "first")
    runner.train()
    runner.save_checkpoint(str(tmp_path / "first"), "numpy_meta.pth", meta=dict(NUMPY_META))
    return tmp_path


def test_runner_checkpoints_need_the_allow_list_and_load_with_it(trained):
    for name in ("epoch_1.pth", "numpy_meta.pth"):
        path = str(trained / "first" / name)
        with _without_our_allow_list(), pytest.raises(pickle.UnpicklingError):
            torch.load(path)  # torch >= 2.6 default: weights_only=True
        loaded = torch.load(path)
        assert {"meta", "state_dict", "message_hub", "optimizer", "param_schedulers"} <= set(loaded)
        assert np.isfinite(loaded["message_hub"]["log_scalars"]["train/loss"].mean())
    meta = torch.load(str(trained / "first" / "numpy_meta.pth"))["meta"]
    assert {k: meta[k] for k in NUMPY_META} == NUMPY_META


def test_disallow_takes_off_exactly_ours():
    class Other:
        pass

    torch.serialization.add_safe_globals([Other])
    try:
        with _without_our_allow_list():
            remaining = torch.serialization.get_safe_globals()
            assert Other in remaining and not any(entry in remaining for entry in safe_checkpoint.safe_globals())
        assert all(entry in torch.serialization.get_safe_globals() for entry in safe_checkpoint.safe_globals())
    finally:
        kept = [entry for entry in torch.serialization.get_safe_globals() if entry is not Other]
        torch.serialization.clear_safe_globals()
        torch.serialization.add_safe_globals(kept)


def test_allow_list_refuses_other_getattr_targets():
    with pytest.raises(pickle.UnpicklingError, match="getattr"):
        safe_checkpoint._history_buffer_statistic(torch, "load")


def test_load_from_and_resume(trained):
    checkpoint = str(trained / "first" / "numpy_meta.pth")
    runner = _runner(trained, "load_from", load_from=checkpoint)
    runner.load_or_resume()
    expected = torch.load(checkpoint)["state_dict"]
    for key, value in runner.model.state_dict().items():
        torch.testing.assert_close(value, expected[key], msg=key)

    resumed = _runner(
        trained, "resume", load_from=str(trained / "first" / "epoch_1.pth"), resume=True, **{"train_cfg.max_epochs": 2}
    )
    resumed.train()
    assert resumed.epoch == 2 and resumed.iter == 4  # 2 images, batch 1: epoch 1 restored, epoch 2 trained
