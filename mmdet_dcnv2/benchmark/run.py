"""One run of the benchmark: train an arm at a seed from the paired initial state, measure its
deformable layers as it trains, evaluate it on each requested split, draw it, write ``metrics.json``."""

import json
import os
import os.path as osp
import shutil
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional

from .arms import ARMS, config_path
from .workdir import claim, config_hash

METRIC_KEYS = ("bbox_mAP", "bbox_mAP_50", "bbox_mAP_75", "bbox_mAP_s", "bbox_mAP_m", "bbox_mAP_l")


@dataclass
class RunOptions:
    """What every run of one command shares (the CLI's options)."""

    work_dir: str
    data_root: str
    pretrained: Dict  # mmdet_dcnv2.benchmark.pretrained.verify()'s record
    data_checksums: Dict
    eval_splits: List[str] = field(default_factory=lambda: ["test", "test_rigid"])
    iters: Optional[int] = None
    batch_size: Optional[int] = None
    threads: int = 1
    num_vis: int = 8
    score_thr: float = 0.5
    health_interval: int = 100
    outside_warning: float = 0.5
    cfg_options: Optional[Dict] = None
    distributed: bool = False


def run_dir(options: RunOptions, arm: str, seed: int) -> str:
    return osp.abspath(osp.join(options.work_dir, arm, f"seed{seed}"))


def initial_state_path(options: RunOptions, seed: int) -> str:
    return osp.abspath(osp.join(options.work_dir, "initial_state", f"seed{seed}.pth"))


def _split_files(data_root: str, split: str) -> Dict:
    return dict(ann=osp.join(data_root, "annotations", f"instances_{split}.json"), img=f"{split}/")


def build_config(arm: str, seed: int, options: RunOptions, for_pairing: bool = False):
    """The arm's config with this command's data, schedule, seed, pretrained weights and hooks."""
    from mmengine.config import Config

    cfg = Config.fromfile(config_path(arm))
    data_root = osp.abspath(options.data_root).rstrip("/") + "/"
    for split in ("train", "val", "test"):
        cfg[f"{split}_dataloader"].dataset.data_root = data_root
    if options.batch_size is not None:
        cfg.train_dataloader.batch_size = options.batch_size
    for evaluator in ("val_evaluator", "test_evaluator"):
        split = "val" if evaluator.startswith("val") else "test"
        cfg[evaluator].ann_file = _split_files(data_root, split)["ann"]
    if options.iters is not None:
        _set_iters(cfg, options.iters)
    cfg.model.backbone.init_cfg.checkpoint = options.pretrained["path"]
    # Evaluated after training, once per requested split (run()), never inside the training loop: the
    # val loop stays configured (the health hook reads its first images) but starts after the last
    # iteration.
    cfg.train_cfg.val_begin = cfg.train_cfg.max_iters + 1
    cfg.randomness = dict(seed=seed, deterministic=False)
    cfg.custom_hooks = list(cfg.get("custom_hooks", [])) + [
        dict(
            type="DeformHealthHook",
            interval=options.health_interval,
            num_images=8,
            outside_warning=options.outside_warning,
        )
    ]
    if options.distributed:
        cfg.launcher = "pytorch"
        cfg.env_cfg.dist_cfg = dict(backend="gloo")
        cfg.model_wrapper_cfg = dict(type="MMDistributedDataParallel", device_ids=None)
    if options.cfg_options:
        cfg.merge_from_dict(options.cfg_options)
    if not for_pairing:
        cfg.work_dir = run_dir(options, arm, seed)
        cfg.load_from = initial_state_path(options, seed)
        # Unique names: the Runner's logger, message hub and visualizer are process-wide singletons by name.
        name = f"{arm}_seed{seed}_{time.strftime('%Y%m%d_%H%M%S')}_{os.getpid()}"
        cfg.experiment_name = name
        cfg.visualizer.name = name
    return cfg


def _set_iters(cfg, iters: int) -> None:
    """Scale the iteration schedule (warm-up, lr steps, checkpoint, health) to ``iters``."""
    old = cfg.train_cfg.max_iters
    cfg.train_cfg.max_iters = cfg.train_cfg.val_interval = iters
    cfg.train_cfg.val_begin = iters + 1
    for scheduler in cfg.param_scheduler:
        if scheduler.get("type") == "LinearLR":
            scheduler.end = min(scheduler.end, max(1, iters // 10))
        else:
            scheduler.end = iters
            if "milestones" in scheduler:
                scheduler.milestones = [max(1, round(m * iters / old)) for m in scheduler.milestones]
    cfg.default_hooks.checkpoint.interval = iters
    cfg.default_hooks.logger.interval = min(cfg.default_hooks.logger.interval, max(1, iters // 5))


def signature(arm: str, seed: int, cfg, options: RunOptions) -> Dict:
    return {
        "arm": arm,
        "seed": seed,
        "config": ARMS[arm].config,
        "config_sha256": config_hash(cfg),
        "pretrained_sha256": options.pretrained["sha256"],
        "data_checksums": options.data_checksums,
        "eval_splits": list(options.eval_splits),
        "threads": options.threads,
    }


def _evaluate(runner, split: str, out_dir: str, data_root: str) -> Dict:
    """COCO bbox metrics of ``runner``'s model on ``split`` (mmdet's CocoMetric; detections kept as
    ``detections_<split>.bbox.json`` for the paired statistics), plus class-correct recall at 0.5."""
    from mmengine.runner import TestLoop

    from mmdet_dcnv2.evaluation import ImageLevelEval, class_correct_recall

    files = _split_files(osp.abspath(data_root), split)
    dataloader = runner.cfg.test_dataloader.copy()
    dataloader["dataset"] = dict(dataloader["dataset"], ann_file=files["ann"], data_prefix=dict(img=files["img"]))
    prefix = osp.join(out_dir, f"detections_{split}")
    evaluator = dict(type="CocoMetric", ann_file=files["ann"], metric="bbox", classwise=True, outfile_prefix=prefix)
    start = time.perf_counter()
    metrics = TestLoop(runner, dataloader, evaluator).run()
    coco = {key.split("/", 1)[1]: float(value) for key, value in metrics.items() if key.startswith("coco/")}
    evaluation = ImageLevelEval(files["ann"], prefix + ".bbox.json")
    recall = class_correct_recall(evaluation, score_thr=0.5, iou_thr=0.5)
    return {
        "bbox": {key: coco[key] for key in METRIC_KEYS if key in coco},
        "bbox_per_class": {k[: -len("_precision")]: v for k, v in coco.items() if k.endswith("_precision")},
        "recall_at_score_0.5": {k: recall[k] for k in ("recall", "matched", "total")},
        "instances_by_area": {
            label: int(evaluation.num_pos[:, a, :].sum()) for a, label in enumerate(evaluation.area_labels)
        },
        "images": evaluation.num_images,
        "detections_file": osp.basename(prefix + ".bbox.json"),
        "time_s": round(time.perf_counter() - start, 1),
    }


def _deformable_layers(model) -> Dict:
    names = sorted({type(m).__name__ for m in model.modules() if hasattr(m, "conv_offset") or hasattr(m, "offset_fc")})
    count = sum(1 for m in model.modules() if hasattr(m, "conv_offset") or hasattr(m, "offset_fc"))
    return {"types": names, "count": count}


def run(arm: str, seed: int, options: RunOptions) -> Dict:
    """Train and evaluate ``arm`` at ``seed``; returns (and writes) its metrics. A finished identical
    run found in its directory is returned as it is (mmdet_dcnv2.benchmark.workdir)."""
    import torch
    from mmengine.runner import Runner

    from mmdet_dcnv2.engine import unwrap_model
    from mmdet_dcnv2.engine.deform_health import DeformHealthHook

    from .pairing import check_compatible
    from .pictures import draw_detections, plot_losses, train_scalars

    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    cfg = build_config(arm, seed, options)
    out_dir = cfg.work_dir
    done = claim(out_dir, signature(arm, seed, cfg, options)) if rank == 0 else None
    if torch.distributed.is_initialized():  # every rank reuses, or every rank trains
        shared = [done]
        torch.distributed.broadcast_object_list(shared, src=0)
        done = shared[0]
    if done is not None:
        if rank == 0:
            print(f"{arm} seed {seed}: reusing the finished run in {out_dir}", flush=True)
        return done if rank == 0 else {}
    runner = Runner.from_cfg(cfg)
    model = unwrap_model(runner.model)
    initial = torch.load(cfg.load_from, map_location="cpu", weights_only=True)["state_dict"]
    not_shared = check_compatible(initial, model)

    start = time.perf_counter()
    runner.train()
    train_time = time.perf_counter() - start
    health_hook = next((h for h in runner.hooks if isinstance(h, DeformHealthHook)), None)
    evaluations = {split: _evaluate(runner, split, out_dir, options.data_root) for split in options.eval_splits}
    if rank != 0:
        return {}

    log_dir = runner.log_dir
    shutil.copy(osp.join(log_dir, f"{runner.timestamp}.log"), osp.join(out_dir, "train.log"))
    scalars = osp.join(log_dir, "vis_data", "scalars.json")
    records = []
    if osp.exists(scalars):  # absent if no iteration was logged
        shutil.copy(scalars, osp.join(out_dir, "scalars.json"))
        records = train_scalars(scalars)
    plot_losses({arm: records}, osp.join(out_dir, "loss_curve.png"), f"{ARMS[arm].label}, seed {seed}")
    vis_split = "test" if "test" in options.eval_splits else options.eval_splits[0]
    images = draw_detections(runner, osp.join(out_dir, "vis"), options.num_vis, options.score_thr, split=vis_split)

    health = health_hook.last if health_hook is not None else None
    result = {
        "model": arm,
        "label": ARMS[arm].label,
        "config": ARMS[arm].config,
        "seed": seed,
        "iterations": runner.iter,
        "batch_size": cfg.train_dataloader.batch_size,
        "threads": options.threads,
        "train_images": len(runner.train_dataloader.dataset),
        "world_size": runner.world_size,
        "deformable_layers": _deformable_layers(model),
        "pretrained": {"path": options.pretrained["path"], "sha256": options.pretrained["sha256"]},
        "initial_state": {"path": cfg.load_from, "keys_not_shared": not_shared},
        "train_time_s": round(train_time, 1),
        "s_per_iter": round(train_time / max(1, runner.iter), 3),
        "evaluation": evaluations,
        "deform_health": health,
        "final_loss": records[-1]["loss"] if records else None,
        "loss_curve": [{"step": r["step"], "loss": r["loss"]} for r in records],
        "visualisations": [osp.relpath(p, out_dir) for p in images],
        "work_dir": out_dir,
        "data_root": osp.abspath(options.data_root),
    }
    tmp = osp.join(out_dir, "metrics.json.tmp")
    with open(tmp, "w") as f:
        json.dump(result, f, indent=1)
    os.replace(tmp, osp.join(out_dir, "metrics.json"))
    return result
