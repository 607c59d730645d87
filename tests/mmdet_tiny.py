"""Tiny COCO data and shrunk two-stage detectors for the mmdet integration tests.

The zoo configs are full-size R-50 Faster/Mask R-CNNs at 1333x800; these helpers turn one into a
network a 2-core CI machine trains for a couple of iterations in seconds: ResNet-50 blocks with
base_channels=8 (DCN placement unchanged), 32-channel FPN and heads, 16-unit deformable-pool fc
branches, 64x64 images. Everything is expressed as mmengine ``--cfg-options`` so the same overrides
serve in-process configs and the ``mim``/``tools`` command lines.
"""

import importlib.util
import json
import os
from typing import Dict, List

import numpy as np
import torch
from mmengine.config import Config

CUSTOM_IMPORTS = "custom_imports = dict(imports=['mmdet_dcnv2'], allow_failed_imports=False)\n"
# Our configs/dcnv2 as installed (inside the package, where mim finds them). Located without
# importing mmdet_dcnv2: processes that must run without the plugin use these helpers too.
OUR_CONFIGS = os.path.join(os.path.dirname(importlib.util.find_spec("mmdet_dcnv2").origin), ".mim", "configs", "dcnv2")
CHANNELS = 32
IMAGE_SIZE = 64
CATEGORIES = [{"id": 1, "name": "person"}, {"id": 3, "name": "car"}]


def write_config(path: str, base: str, extra: str = "") -> str:
    """A user's config: ``_base_`` (a path or ``mmdet::...``) plus our custom_imports."""
    with open(path, "w") as f:
        f.write(f"_base_ = {base!r}\n{CUSTOM_IMPORTS}{extra}")
    return path


def make_tiny_coco(root: str, num_images: int = 2, seed: int = 0) -> str:
    """COCO layout (annotations/instances_{train,val}2017.json, {train,val}2017/*.png) under root."""
    import cv2

    rng = np.random.default_rng(seed)
    os.makedirs(os.path.join(root, "annotations"), exist_ok=True)
    for split in ("train2017", "val2017"):
        os.makedirs(os.path.join(root, split), exist_ok=True)
        images, annotations = [], []
        for image_id in range(1, num_images + 1):
            name = f"{image_id:012d}.png"
            pixels = rng.integers(0, 255, (IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
            for k, (x, y, w, h) in enumerate(((8, 10, 30, 24), (34, 30, 24, 28))):
                pixels[y : y + h, x : x + w] = 60 + 120 * k  # flat boxes a detector can latch onto
                polygon = [x, y, x + w, y, x + w, y + h, x, y + h]
                annotations.append(
                    {
                        "id": len(annotations) + 1,
                        "image_id": image_id,
                        "category_id": CATEGORIES[k]["id"],
                        "bbox": [x, y, w, h],
                        "area": w * h,
                        "iscrowd": 0,
                        "segmentation": [polygon],
                    }
                )
            cv2.imwrite(os.path.join(root, split, name), pixels)
            images.append({"id": image_id, "file_name": name, "width": IMAGE_SIZE, "height": IMAGE_SIZE})
        with open(os.path.join(root, "annotations", f"instances_{split}.json"), "w") as f:
            json.dump({"images": images, "annotations": annotations, "categories": CATEGORIES}, f)
    return root


def _resize_index(pipeline) -> int:
    return next(i for i, step in enumerate(pipeline) if step["type"] == "Resize")


def tiny_model_options(cfg: Config) -> Dict[str, object]:
    """Shrink an R-50 FPN Faster/Mask R-CNN config (mdconv and mdpool variants included)."""
    c = CHANNELS
    options: Dict[str, object] = {
        "model.backbone.base_channels": 8,  # block outputs 32, 64, 128, 256
        "model.backbone.init_cfg": None,  # no pretrained download
        "model.neck.in_channels": [32, 64, 128, 256],
        "model.neck.out_channels": c,
        "model.rpn_head.in_channels": c,
        "model.rpn_head.feat_channels": c,
        "model.roi_head.bbox_head.in_channels": c,
        "model.roi_head.bbox_head.fc_out_channels": c,
        "model.train_cfg.rpn_proposal.nms_pre": 200,
        "model.train_cfg.rpn_proposal.max_per_img": 50,
        "model.train_cfg.rcnn.sampler.num": 32,
        "model.test_cfg.rpn.nms_pre": 200,
        "model.test_cfg.rpn.max_per_img": 50,
    }
    heads = ["bbox"] + (["mask"] if "mask_head" in cfg.model.roi_head else [])
    for head in heads:
        extractor = f"model.roi_head.{head}_roi_extractor"
        options[f"{extractor}.out_channels"] = c
        if "output_channels" in cfg.model.roi_head[f"{head}_roi_extractor"].roi_layer:
            options[f"{extractor}.roi_layer.output_channels"] = c
            options[f"{extractor}.roi_layer.deform_fc_channels"] = 16
    if "mask_head" in cfg.model.roi_head:
        options["model.roi_head.mask_head.in_channels"] = c
        options["model.roi_head.mask_head.conv_out_channels"] = c
    return options


def tiny_config(name: str, **extra) -> Config:
    """Our config ``name`` (of OUR_CONFIGS) shrunk by tiny_model_options, then ``extra`` merged."""
    cfg = Config.fromfile(os.path.join(OUR_CONFIGS, f"{name}.py"))
    cfg.merge_from_dict(tiny_model_options(cfg))
    cfg.merge_from_dict(extra)
    return cfg


def tiny_data_options(cfg: Config, data_root: str, work_dir: str = None) -> Dict[str, object]:
    """Train/val/test on make_tiny_coco's data at 64x64, one epoch of batch 1, single process."""
    size = (IMAGE_SIZE, IMAGE_SIZE)
    options: Dict[str, object] = {
        "train_cfg.max_epochs": 1,
        "default_hooks.logger.interval": 1,
        "default_hooks.checkpoint.interval": 1,
    }
    for split in ("train", "val", "test"):
        loader = cfg[f"{split}_dataloader"]
        prefix = f"{split}_dataloader"
        options.update(
            {
                f"{prefix}.batch_size": 1,
                f"{prefix}.num_workers": 0,
                f"{prefix}.persistent_workers": False,
                f"{prefix}.dataset.data_root": data_root,
                f"{prefix}.dataset.pipeline.{_resize_index(loader.dataset.pipeline)}.scale": size,
            }
        )
    ann = os.path.join(data_root, "annotations", "instances_val2017.json")
    options.update({"val_evaluator.ann_file": ann, "test_evaluator.ann_file": ann})
    if work_dir is not None:
        options["work_dir"] = work_dir
    return options


def tiny_options(cfg: Config, data_root: str, work_dir: str = None) -> Dict[str, object]:
    return {**tiny_model_options(cfg), **tiny_data_options(cfg, data_root, work_dir)}


def as_cfg_options(options: Dict[str, object]) -> List[str]:
    """``--cfg-options`` arguments: ``key=value`` with lists as [a,b] and tuples as (a,b)."""

    def text(value):
        if isinstance(value, (list, tuple)):
            inner = ",".join(text(v) for v in value)
            return f"[{inner}]" if isinstance(value, list) else f"({inner})"
        return str(value)

    return ["--cfg-options"] + [f"{key}={text(value)}" for key, value in options.items() if key != "work_dir"]


def rpn_proposals_in_float32(rpn_head):
    """mmcv's CPU nms has no bfloat16 kernel (not our op): make proposals from float32 scores, as
    mmdet does when autocast leaves its heads in float."""
    predict = rpn_head.predict_by_feat

    def predict_in_float(*args, **kwargs):
        def to_float(value):
            if isinstance(value, (list, tuple)) and value and isinstance(value[0], torch.Tensor):
                return [v.float() for v in value]
            return value

        with torch.autocast("cpu", enabled=False):
            return predict(*[to_float(a) for a in args], **{k: to_float(v) for k, v in kwargs.items()})

    rpn_head.predict_by_feat = predict_in_float
