"""Two-process CPU (gloo) training of a small mdconv detector through mmengine's Runner.

mmengine 0.10.7 cannot launch this by itself on a CPU-only machine: its pytorch launcher calls
torch.cuda.set_device, its DDP wrapper passes device_ids=[local_rank], and the default backend is
nccl. What works (and what the README tells CPU users): initialise a gloo process group before the
Runner (it then skips its own init) and wrap with ``model_wrapper_cfg=dict(
type='MMDistributedDataParallel', device_ids=None)``. On GPUs, mmdet's usual launchers apply.
"""

import json
import os
import socket
import subprocess
import sys

import pytest

pytest.importorskip("mmdet")

from mmdet_tiny import make_tiny_coco  # noqa: E402

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))

WORKER = r"""
import json, os, sys
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

def worker(rank, world_size, port, data_root, work_dir, out_dir, base, options):
    os.environ.update(MASTER_ADDR='127.0.0.1', MASTER_PORT=str(port), RANK=str(rank),
                      LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size))
    torch.set_num_threads(1)
    dist.init_process_group('gloo', rank=rank, world_size=world_size)
    from mmengine.config import Config
    from mmengine.runner import Runner
    from mmdet_tiny import tiny_options, write_config
    cfg = Config.fromfile(write_config(os.path.join(out_dir, 'cfg.py'), base))
    cfg.merge_from_dict(tiny_options(cfg, data_root, work_dir))
    cfg.merge_from_dict(json.loads(options))
    cfg.merge_from_dict({'train_cfg.max_epochs': 2, 'launcher': 'pytorch', 'randomness.seed': 0,
                         'env_cfg.dist_cfg.backend': 'gloo',
                         'model_wrapper_cfg': dict(type='MMDistributedDataParallel', device_ids=None)})
    cfg.val_cfg = cfg.val_dataloader = cfg.val_evaluator = None
    runner = Runner.from_cfg(cfg)
    runner.train()
    model = runner.model.module
    kinds = sorted({type(m).__name__ for m in model.modules() if hasattr(m, 'conv_offset')})  # the DCN layers
    torch.save({k: v.detach() for k, v in model.named_parameters()}, os.path.join(out_dir, f'rank{rank}.pt'))
    with open(os.path.join(out_dir, f'rank{rank}.json'), 'w') as f:
        json.dump({'iter': runner.iter, 'world_size': dist.get_world_size(), 'kinds': kinds,
                   'wrapper': type(runner.model).__name__}, f)
    dist.destroy_process_group()

if __name__ == '__main__':
    port, data_root, work_dir, out_dir, base, options = int(sys.argv[1]), *sys.argv[2:7]
    mp.spawn(worker, args=(2, port, data_root, work_dir, out_dir, base, options), nprocs=2, join=True)
"""


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


MIMIC_CONFIG = os.path.join("dcnv2", "faster_rcnn_r50_fpn_mdconv_c3-c5_mdpool_mimic_1x_coco.py")


@pytest.mark.slow
@pytest.mark.parametrize(
    "base, options",
    [
        ("mmdet::dcnv2/faster-rcnn_r50-mdconv-c3-c5_fpn_1x_coco.py", {}),
        # R-CNN feature mimicking: a second backbone pass on the crops and a parameter (the R-CNN
        # classifier) used only by the mimic losses, under DDP without find_unused_parameters.
        (MIMIC_CONFIG, {"model.roi_head.crop_size": 32, "model.roi_head.num_rois": 4}),
    ],
    ids=["mdconv", "mdconv_mdpool_mimic"],
)
def test_two_process_gloo_training_keeps_ranks_in_sync(tmp_path, base, options):
    import torch

    import mmdet_dcnv2

    if base == MIMIC_CONFIG:
        base = os.path.join(os.path.dirname(mmdet_dcnv2.__file__), ".mim", "configs", base)

    data_root = make_tiny_coco(str(tmp_path / "data"), num_images=4)
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([TESTS_DIR, os.environ.get("PYTHONPATH", "")]))
    run = subprocess.run(
        [
            sys.executable,
            str(script),
            str(_free_port()),
            data_root,
            str(tmp_path / "work"),
            str(tmp_path),
            base,
            json.dumps(options),
        ],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stderr[-4000:]

    reports = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    for report in reports:
        # 4 images over 2 ranks with batch 1: 2 iterations per epoch, 2 epochs.
        assert report == {"iter": 4, "world_size": 2, "kinds": ["MDConv"], "wrapper": "MMDistributedDataParallel"}
    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt") for r in range(2))
    assert rank0.keys() == rank1.keys()
    for key in rank0:
        torch.testing.assert_close(rank0[key], rank1[key], rtol=0, atol=0, msg=key)
    assert any("conv_offset" in k and rank0[k].abs().sum() > 0 for k in rank0)  # offsets trained off zero
    if options:
        assert "roi_head.rcnn_cls.weight" in rank0
