"""The pictures of a run: loss curves (matplotlib) and detections beside the ground truth (mmdet's
DetLocalVisualizer), and the Runner's logged training scalars they are drawn from."""

import json
import os
import os.path as osp
from typing import Dict, List


def train_scalars(path: str) -> List[Dict]:
    """The training records of the Runner's ``vis_data/scalars.json`` (one JSON object per line)."""
    records = []
    with open(path) as f:
        for line in f:
            line = line.strip()
            if line:
                record = json.loads(line)
                if "loss" in record:
                    records.append(record)
    return records


def plot_losses(curves: Dict[str, List[Dict]], out_file: str, title: str, components: bool = True) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label, records in curves.items():
        steps = [r["step"] for r in records]
        marker = "o" if len(steps) < 30 else None  # a handful of points (a short run) stay visible
        ax.plot(steps, [r["loss"] for r in records], label=f"{label} loss", linewidth=2, marker=marker)
        if components:
            for key in ("loss_rpn_cls", "loss_rpn_bbox", "loss_cls", "loss_bbox"):
                if records and key in records[0]:
                    ax.plot(steps, [r[key] for r in records], label=key, linewidth=1, alpha=0.8, marker=marker)
    ax.set_xlabel("iteration")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out_file, dpi=100)
    plt.close(fig)


def _upscale(data_sample, factor: int):
    """A copy of a DetDataSample with its gt and predicted boxes scaled by ``factor`` (for drawing)."""
    data_sample = data_sample.clone()
    for field in ("gt_instances", "pred_instances"):
        if field in data_sample:
            instances = data_sample.get(field)
            if hasattr(instances.bboxes, "rescale_"):  # mmdet's HorizontalBoxes
                instances.bboxes.rescale_([factor, factor])
            else:
                instances.bboxes = instances.bboxes * factor
    return data_sample


def draw_detections(
    runner, out_dir: str, num_images: int, score_thr: float, split: str = "test", scale: int = 3
) -> List[str]:
    """Ground truth (left) beside predictions (right) on the first images of ``split``, by mmdet's
    DetLocalVisualizer; images are enlarged ``scale`` times so that labels stay legible."""
    import mmcv
    import torch
    from mmdet.registry import DATASETS
    from mmengine.dataset import pseudo_collate

    from mmdet_dcnv2.engine import unwrap_model

    model = unwrap_model(runner.model)
    model.eval()
    dataset_cfg = dict(
        runner.cfg.test_dataloader.dataset,
        ann_file=f"annotations/instances_{split}.json",
        data_prefix=dict(img=f"{split}/"),
    )
    dataset = DATASETS.build(dataset_cfg)
    visualizer = runner.visualizer
    visualizer.dataset_meta = dataset.metainfo
    os.makedirs(out_dir, exist_ok=True)
    written = []
    for index in range(min(num_images, len(dataset))):
        with torch.no_grad():
            result = model.test_step(pseudo_collate([dataset[index]]))[0]
        image = mmcv.imread(result.img_path, channel_order="rgb")
        image = mmcv.imrescale(image, scale, interpolation="nearest")
        out_file = osp.join(out_dir, osp.basename(result.img_path))
        visualizer.add_datasample(
            osp.basename(result.img_path),
            image,
            data_sample=_upscale(result, scale),
            draw_gt=True,
            draw_pred=True,
            show=False,
            pred_score_thr=score_thr,
            out_file=out_file,
        )
        written.append(out_file)
    return written
