"""Pretrain the shapes benchmark's backbone on a classification task, as the paper starts from ImageNet.

    python -P -m mmdet_dcnv2.tools.pretrain_backbone --out ~/.cache/mmdet_dcnv2/pretrained/shapes_resnet50_w16.pth

The backbone is the detectors' own (mmdet's ResNet-50 with ``base_channels=16``, regular 3x3
convolutions everywhere: a deformable layer built on it starts from these weights with its offset conv
at zero). It learns to name the one shape in a 64x64 image drawn from the generator's classification
stream (``mmdet_dcnv2.datasets.shapes.classification_sample``: stream 4, disjoint from train, val and
both test splits), through global average pooling and a linear layer that is thrown away afterwards.

Writes OUT (the backbone's state dict, float16 to keep it small: ~3 MB) and OUT's sidecar
``<OUT without .pth>.json`` (its sha256, held-out accuracy, steps, time, machine). Nothing is shipped:
``make pretrain`` (or the demo's first run) writes it to the cache the configs read
(``mmdet_dcnv2.benchmark.pretrained.default_path()``). CPU training is not bitwise reproducible across
CPUs, so each machine's file has its own hash: the demo checks a file against the hash in its sidecar,
and records the hash it used.

Budget: ~13 min on 2 cores (``--threads 2``); progress and an ETA are printed. From scratch, the loss
sits near ln 6 for the first ~500 steps before it falls: shorter schedules do not get off that plateau.
"""

import argparse
import hashlib
import json
import os
import os.path as osp
import time
from typing import Dict, Tuple

import numpy as np

from mmdet_dcnv2.datasets import shapes

# The detectors' backbone (configs/shapes/*.py), with regular convolutions.
BACKBONE = dict(type="ResNet", depth=50, base_channels=16, num_stages=4, out_indices=(3,), norm_eval=False)
FEATURE_CHANNELS = 512  # last stage's output channels at base_channels=16


def sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def sidecar_path(weights: str) -> str:
    return osp.splitext(weights)[0] + ".json"


def make_samples(first: int, count: int, seed: int, size: int) -> Tuple[np.ndarray, np.ndarray]:
    templates = shapes._templates()
    images = np.empty((count, size, size, 3), np.uint8)
    labels = np.empty(count, np.int64)
    for i in range(count):
        images[i], labels[i] = shapes.classification_sample(first + i, seed=seed, size=size, templates=templates)
    return images, labels


def _to_tensor(images: np.ndarray):
    import torch

    # The detectors' data preprocessor: ImageNet mean/std on RGB (mmdet's Faster R-CNN defaults).
    mean = torch.tensor([123.675, 116.28, 103.53]).view(1, 3, 1, 1)
    std = torch.tensor([58.395, 57.12, 57.375]).view(1, 3, 1, 1)
    return (torch.from_numpy(images).permute(0, 3, 1, 2).float() - mean) / std


def accuracy(backbone, head, images: np.ndarray, labels: np.ndarray, batch: int = 128) -> float:
    import torch

    backbone.eval()
    correct = 0
    with torch.no_grad():
        for start in range(0, len(images), batch):
            x = _to_tensor(images[start : start + batch])
            logits = head(backbone(x)[-1].mean((2, 3)))
            correct += int((logits.argmax(1) == torch.from_numpy(labels[start : start + batch])).sum())
    backbone.train()
    return correct / len(images)


def pretrain(
    out: str,
    num_samples: int = 24000,
    num_holdout: int = 2000,
    steps: int = 6000,
    batch_size: int = 64,
    lr: float = 2e-3,
    size: int = 64,
    seed: int = 0,
    threads: int = 2,
) -> Dict:
    import torch
    from mmdet.registry import MODELS

    import mmdet_dcnv2  # noqa: F401  (mmdet's registries, initialised)
    from mmdet_dcnv2.benchmark.report import machine

    for name, value in (("num_samples", num_samples), ("num_holdout", num_holdout), ("steps", steps)):
        if value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value}")
    if threads:
        torch.set_num_threads(threads)
    started = time.perf_counter()
    print(f"pretrain: generating {num_samples} training + {num_holdout} held-out samples ({size}x{size})", flush=True)
    train_x, train_y = make_samples(0, num_samples, seed, size)
    hold_x, hold_y = make_samples(num_samples, num_holdout, seed, size)
    generated = time.perf_counter() - started

    torch.manual_seed(seed)
    backbone = MODELS.build(BACKBONE)
    backbone.init_weights()
    head = torch.nn.Linear(FEATURE_CHANNELS, len(shapes.CLASSES))
    params = list(backbone.parameters()) + list(head.parameters())
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.05)
    warmup = max(1, steps // 20)
    report = max(1, steps // 24)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + np.cos(np.pi * min(s, steps) / steps)),
    )
    order = torch.Generator().manual_seed(seed)
    permutation = torch.randperm(num_samples, generator=order)
    cursor, losses = 0, []
    train_start = time.perf_counter()
    backbone.train()
    for step in range(steps):
        if cursor + batch_size > num_samples:
            permutation, cursor = torch.randperm(num_samples, generator=order), 0
        index = permutation[cursor : cursor + batch_size].numpy()
        cursor += batch_size
        x = _to_tensor(train_x[index])
        flip = torch.rand(len(index), generator=order) < 0.5
        x[flip] = x[flip].flip(-1)
        logits = head(backbone(x)[-1].mean((2, 3)))
        loss = torch.nn.functional.cross_entropy(logits, torch.from_numpy(train_y[index]))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
        if (step + 1) % report == 0 or step + 1 == steps:
            elapsed = time.perf_counter() - train_start
            eta = elapsed / (step + 1) * (steps - step - 1)
            print(
                f"pretrain: step {step + 1}/{steps}  loss {np.mean(losses[-report:]):.3f}  "
                f"{elapsed / (step + 1):.2f} s/step  ETA {eta / 60:.1f} min",
                flush=True,
            )
    held_out = accuracy(backbone, head, hold_x, hold_y)
    print(f"pretrain: held-out accuracy {held_out:.3f} on {num_holdout} samples", flush=True)

    state = {k: (v.half() if v.is_floating_point() else v) for k, v in backbone.state_dict().items()}
    os.makedirs(osp.dirname(osp.abspath(out)), exist_ok=True)
    tmp = out + ".tmp"
    torch.save(state, tmp)
    os.replace(tmp, out)
    record = {
        "sha256": sha256(out),
        "backbone": BACKBONE,
        "held_out_accuracy": round(held_out, 4),
        "num_samples": num_samples,
        "num_holdout": num_holdout,
        "steps": steps,
        "batch_size": batch_size,
        "lr": lr,
        "size": size,
        "seed": seed,
        "threads": threads,
        "final_loss": round(float(np.mean(losses[-report:])), 4),
        "generate_time_s": round(generated, 1),
        "train_time_s": round(time.perf_counter() - train_start, 1),
        "machine": machine(),
        "torch": torch.__version__,
        "dataset_version": shapes.VERSION,
    }
    with open(sidecar_path(out), "w") as f:
        json.dump(record, f, indent=1)
    print(f"pretrain: wrote {out} (sha256 {record['sha256'][:16]}...) and {sidecar_path(out)}", flush=True)
    return record


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="where to write the backbone weights (.pth)")
    parser.add_argument("--steps", type=int, default=6000)
    parser.add_argument("--num-samples", type=int, default=24000)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (0: torch's default)")
    args = parser.parse_args(argv)
    if not args.out.endswith(".pth"):
        parser.error(f"--out must name a .pth file, got {args.out!r}")
    try:
        pretrain(
            args.out,
            num_samples=args.num_samples,
            steps=args.steps,
            batch_size=args.batch_size,
            lr=args.lr,
            seed=args.seed,
            threads=args.threads,
        )
    except ValueError as error:
        parser.error(str(error))


if __name__ == "__main__":
    main()
