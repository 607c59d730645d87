"""A small detection dataset with strong geometric variation, generated deterministically.

Six classes of glyph-like shapes (triangle, star, plus, ell, ring, arrow), each instance randomly
rotated (any angle), scaled (14-44 px on 128x128 images by default), stretched, sheared and
elastically warped, in random colours and textures (colour says nothing about the class), on
gradient backgrounds with clutter (line segments, unannotated blobs). Instances overlap each other
and are partly hidden by unannotated occluders, never below half of their area. Boxes are the
visible extent of each instance (COCO convention).

Layout (COCO format, loads with pycocotools and mmdet's ``CocoDataset``)::

    OUT/annotations/instances_train.json   OUT/train/000000.png ...
    OUT/annotations/instances_val.json     OUT/val/000000.png ...
    OUT/meta.json                          the generation parameters (written last: marks completion)

Every image is drawn from its own random stream, seeded by (seed, split, index): the same
parameters give byte-identical files on any machine with the same OpenCV, and the first N images of
a split do not depend on how many are generated.

    python -m mmdet_dcnv2.datasets.shapes --out data/shapes [--num-train 600 --num-val 150 --seed 0]
"""

import argparse
import json
import math
import os
from typing import Dict, List, Optional, Tuple

import numpy as np

CLASSES = ("triangle", "star", "plus", "ell", "ring", "arrow")
SPLITS = ("train", "val")
VERSION = 1  # bump when the drawing changes: stored in meta.json, so old data is regenerated

_TEMPLATE = 64  # canonical template side (pixels); shapes span about 0.95 of it


def _polygon(name: str) -> Optional[np.ndarray]:
    """The class's outline in [-1, 1]^2 (None for the ring, drawn as two circles)."""
    if name == "triangle":
        pts = [(math.cos(a), math.sin(a)) for a in np.deg2rad([-90, 30, 150])]
        return np.array(pts) * np.array([1.0, 1.0]) + np.array([0.0, 0.2])
    if name == "star":
        pts = []
        for k in range(10):
            radius = 1.0 if k % 2 == 0 else 0.42
            angle = -math.pi / 2 + k * math.pi / 5
            pts.append((radius * math.cos(angle), radius * math.sin(angle)))
        return np.array(pts)
    if name == "plus":
        a, b = 0.3, 1.0
        return np.array(
            [(-a, -b), (a, -b), (a, -a), (b, -a), (b, a), (a, a), (a, b), (-a, b), (-a, a), (-b, a), (-b, -a), (-a, -a)]
        )
    if name == "ell":
        return np.array([(-0.7, -1.0), (-0.15, -1.0), (-0.15, 0.45), (0.75, 0.45), (0.75, 1.0), (-0.7, 1.0)])
    if name == "arrow":
        return np.array(
            [(-1.0, -0.22), (0.15, -0.22), (0.15, -0.65), (1.0, 0.0), (0.15, 0.65), (0.15, 0.22), (-1.0, 0.22)]
        )
    if name == "ring":
        return None
    raise ValueError(name)


def _templates() -> List[np.ndarray]:
    """One float32 TxT mask per class, antialiased (drawn at 4x, area-downsampled)."""
    import cv2

    big, shift = _TEMPLATE * 4, 4
    out = []
    for name in CLASSES:
        canvas = np.zeros((big, big), np.uint8)
        half = big / 2
        poly = _polygon(name)
        if poly is None:
            center = (int(half * 16), int(half * 16))
            cv2.circle(canvas, center, int(0.95 * half * 16), 255, -1, cv2.LINE_AA, shift)
            cv2.circle(canvas, center, int(0.55 * half * 16), 0, -1, cv2.LINE_AA, shift)
        else:
            pts = np.round((poly * 0.95 * half + half) * (1 << shift)).astype(np.int32)
            cv2.fillPoly(canvas, [pts], 255, cv2.LINE_AA, shift)
        small = cv2.resize(canvas, (_TEMPLATE, _TEMPLATE), interpolation=cv2.INTER_AREA)
        out.append(small.astype(np.float32) / 255.0)
    return out


def _elastic(template: np.ndarray, rng: np.random.Generator, amplitude: float) -> np.ndarray:
    """Smooth random displacement field (a 4x4 grid of normal displacements, cubic-upsampled)."""
    import cv2

    t = template.shape[0]
    grid = rng.normal(0.0, amplitude, (2, 4, 4)).astype(np.float32)
    dx = cv2.resize(grid[0], (t, t), interpolation=cv2.INTER_CUBIC)
    dy = cv2.resize(grid[1], (t, t), interpolation=cv2.INTER_CUBIC)
    yy, xx = np.mgrid[0:t, 0:t].astype(np.float32)
    return cv2.remap(template, xx + dx, yy + dy, cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT, borderValue=0)


def _affine(rng: np.random.Generator, size: float, center: Tuple[float, float]) -> np.ndarray:
    """2x3 matrix: template centre -> ``center``, random rotation, stretch, shear; extent ~ ``size``."""
    scale = size / _TEMPLATE
    stretch = rng.uniform(-0.3, 0.3)
    sx, sy = scale * math.exp(stretch), scale * math.exp(-stretch)
    shear = rng.uniform(-0.45, 0.45)
    theta = rng.uniform(0.0, 2 * math.pi)
    c, s = math.cos(theta), math.sin(theta)
    rotate = np.array([[c, -s], [s, c]])
    linear = rotate @ np.array([[1.0, shear], [0.0, 1.0]]) @ np.diag([sx, sy])
    offset = np.array(center) - linear @ np.array([_TEMPLATE / 2, _TEMPLATE / 2])
    return np.hstack([linear, offset[:, None]]).astype(np.float64)


def _colour(rng: np.random.Generator) -> np.ndarray:
    return rng.uniform(0, 255, 3)


def _contrasting(rng: np.random.Generator, against: np.ndarray) -> np.ndarray:
    """A random colour at least 90 (L1 over RGB) away from ``against``."""
    for _ in range(20):
        colour = _colour(rng)
        if np.abs(colour - against).sum() >= 90:
            return colour
    return 255.0 - against


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    a, b = _colour(rng), _colour(rng)
    angle = rng.uniform(0, 2 * math.pi)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64) / size
    t = np.clip(0.5 + (xx - 0.5) * math.cos(angle) + (yy - 0.5) * math.sin(angle), 0, 1)[..., None]
    return a * (1 - t) + b * t


def _lines(rng: np.random.Generator, image: np.ndarray, count: int) -> None:
    import cv2

    size = image.shape[0]
    for _ in range(count):
        p, q = rng.uniform(-10, size + 10, 2), rng.uniform(-10, size + 10, 2)
        cv2.line(
            image,
            (int(p[0]), int(p[1])),
            (int(q[0]), int(q[1])),
            _colour(rng).tolist(),
            int(rng.integers(1, 3)),
            cv2.LINE_AA,
        )


def _blob(rng: np.random.Generator, size: int, min_size: float, max_size: float) -> np.ndarray:
    """Mask of an unannotated distractor: a filled ellipse or a roundish random polygon."""
    import cv2

    mask = np.zeros((size, size), np.uint8)
    center = rng.uniform(0, size, 2)
    extent = rng.uniform(min_size, max_size)
    if rng.random() < 0.5:
        axes = (int(extent / 2), int(max(2.0, extent / 2 * rng.uniform(0.3, 1.0))))
        cv2.ellipse(mask, (int(center[0]), int(center[1])), axes, float(rng.uniform(0, 180)), 0, 360, 255, -1)
    else:
        n = int(rng.integers(6, 10))  # many vertices, roundish: not mistakable for a class
        angles = np.sort(rng.uniform(0, 2 * math.pi, n))
        radii = extent / 2 * rng.uniform(0.7, 1.0, n)
        pts = np.stack([center[0] + radii * np.cos(angles), center[1] + radii * np.sin(angles)], 1)
        cv2.fillPoly(mask, [np.round(pts).astype(np.int32)], 255)
    return mask.astype(np.float32) / 255.0


def _paint(image: np.ndarray, soft: np.ndarray, rng: np.random.Generator) -> None:
    """Composite a coloured (sometimes striped) layer through the soft mask, in place."""
    size = image.shape[0]
    ys, xs = np.nonzero(soft > 0.5)
    local = image[ys, xs].mean(0) if len(ys) else image.reshape(-1, 3).mean(0)
    colour = _contrasting(rng, local)
    fill = np.broadcast_to(colour, image.shape).astype(np.float64)
    if rng.random() < 0.4:  # stripes in a second colour
        second = _contrasting(rng, local)
        angle, period = rng.uniform(0, math.pi), rng.uniform(3, 8)
        yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
        t = (0.5 + 0.5 * np.sin(2 * math.pi * (xx * math.cos(angle) + yy * math.sin(angle)) / period))[..., None]
        fill = fill * (1 - t) + second * t
    alpha = soft[..., None].astype(np.float64)
    image *= 1 - alpha
    image += alpha * fill


def draw_image(
    rng: np.random.Generator,
    templates: List[np.ndarray],
    size: int = 128,
    min_size: float = 14.0,
    max_size: float = 44.0,
    max_objects: int = 6,
) -> Tuple[np.ndarray, List[Dict[str, object]]]:
    """One RGB uint8 image and its instances ({'category': index, 'bbox': [x, y, w, h], 'area'})."""
    import cv2

    image = _background(rng, size)
    _lines(rng, image, int(rng.integers(2, 10)))
    for _ in range(int(rng.integers(0, 3))):  # background blobs (under the objects)
        _paint(image, _blob(rng, size, 0.3 * min_size, max_size), rng)

    full: List[np.ndarray] = []  # binary masks of the annotated instances
    visible: List[np.ndarray] = []
    labels: List[int] = []

    def fits(layer: np.ndarray) -> bool:
        """Adding ``layer`` on top leaves every instance at least half visible."""
        return all((vis & ~layer).sum() >= 0.5 * f.sum() for vis, f in zip(visible, full))

    for _ in range(int(rng.integers(1, max_objects + 1))):
        for _attempt in range(20):
            label = int(rng.integers(len(templates)))
            extent = rng.uniform(min_size, max_size)
            center = tuple(rng.uniform(0.35 * extent, size - 0.35 * extent, 2))
            warped = _elastic(templates[label], rng, rng.uniform(0.0, 0.09) * _TEMPLATE)
            soft = cv2.warpAffine(
                warped,
                _affine(rng, extent, center),
                (size, size),
                flags=cv2.INTER_LINEAR,
                borderMode=cv2.BORDER_CONSTANT,
                borderValue=0,
            )
            binary = soft > 0.5
            if binary.sum() >= 0.25 * min_size**2 and fits(binary):
                break
        else:
            continue
        _paint(image, soft, rng)
        visible = [vis & ~binary for vis in visible]
        full.append(binary)
        visible.append(binary.copy())
        labels.append(label)

    for _ in range(int(rng.integers(0, 3))):  # occluders (unannotated, on top)
        soft = _blob(rng, size, 0.3 * min_size, 0.7 * max_size)
        binary = soft > 0.5
        if fits(binary):
            _paint(image, soft, rng)
            visible = [vis & ~binary for vis in visible]
    _lines(rng, image, int(rng.integers(0, 4)))

    image += rng.normal(0.0, 6.0, image.shape)
    image = np.clip(np.round(image), 0, 255).astype(np.uint8)
    instances = []
    for label, vis in zip(labels, visible):
        ys, xs = np.nonzero(vis)
        x0, y0, x1, y1 = int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1
        instances.append({"category": label, "bbox": [x0, y0, x1 - x0, y1 - y0], "area": int(vis.sum())})
    return image, instances


def _params(num_train: int, num_val: int, size: int, seed: int) -> Dict[str, object]:
    return {
        "version": VERSION,
        "classes": list(CLASSES),
        "num_train": num_train,
        "num_val": num_val,
        "size": size,
        "seed": seed,
    }


def is_generated(out: str, num_train: int = 600, num_val: int = 150, size: int = 128, seed: int = 0) -> bool:
    """Whether ``out`` holds a complete dataset generated with exactly these parameters."""
    try:
        with open(os.path.join(out, "meta.json")) as f:
            return json.load(f) == _params(num_train, num_val, size, seed)
    except (OSError, ValueError):
        return False


def generate(
    out: str, num_train: int = 600, num_val: int = 150, size: int = 128, seed: int = 0, verbose: bool = False
) -> str:
    """Write the dataset under ``out`` (see the module docstring); returns ``out``."""
    import cv2

    meta = os.path.join(out, "meta.json")
    if os.path.exists(meta):
        os.remove(meta)
    templates = _templates()
    categories = [{"id": i + 1, "name": name, "supercategory": "shape"} for i, name in enumerate(CLASSES)]
    os.makedirs(os.path.join(out, "annotations"), exist_ok=True)
    for split_index, (split, count) in enumerate(zip(SPLITS, (num_train, num_val))):
        os.makedirs(os.path.join(out, split), exist_ok=True)
        images, annotations = [], []
        for index in range(count):
            rng = np.random.default_rng([seed, split_index, index])
            image, instances = draw_image(
                rng, templates, size=size, min_size=14.0 * size / 128, max_size=44.0 * size / 128
            )
            name = f"{index:06d}.png"
            cv2.imwrite(os.path.join(out, split, name), image[..., ::-1])  # cv2 writes BGR
            images.append({"id": index + 1, "file_name": name, "width": size, "height": size})
            for inst in instances:
                annotations.append(
                    {
                        "id": len(annotations) + 1,
                        "image_id": index + 1,
                        "category_id": inst["category"] + 1,
                        "bbox": inst["bbox"],
                        "area": inst["area"],
                        "iscrowd": 0,
                    }
                )
        with open(os.path.join(out, "annotations", f"instances_{split}.json"), "w") as f:
            json.dump(
                {
                    "info": {"description": f"mmdet_dcnv2 shapes ({split})", "version": VERSION},
                    "images": images,
                    "annotations": annotations,
                    "categories": categories,
                },
                f,
            )
        if verbose:
            print(f"shapes: {count} {split} images, {len(annotations)} instances -> {os.path.join(out, split)}")
    with open(meta, "w") as f:
        json.dump(_params(num_train, num_val, size, seed), f, indent=1)
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="data/shapes", help="output directory (default: data/shapes)")
    parser.add_argument("--num-train", type=int, default=600)
    parser.add_argument("--num-val", type=int, default=150)
    parser.add_argument("--size", type=int, default=128, help="image side in pixels")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--force", action="store_true", help="regenerate even if already complete")
    args = parser.parse_args(argv)
    if not args.force and is_generated(args.out, args.num_train, args.num_val, args.size, args.seed):
        print(f"shapes: {args.out} is already generated with these parameters")
        return
    generate(args.out, args.num_train, args.num_val, args.size, args.seed, verbose=True)


if __name__ == "__main__":
    main()
