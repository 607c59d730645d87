"""A detection benchmark where geometry decides, generated deterministically (nothing downloaded).

Six classes of glyph-like shapes (triangle, star, plus, ell, ring, arrow), each instance under strong
non-rigid variation: any rotation, anisotropic stretch, shear, an articulation (one side of a random
hinge line bent by up to 35 degrees) and a smooth elastic warp of up to 6% of its size; in random
colours and stripes (colour says nothing about the class), on gradient backgrounds with line clutter
and unannotated blobs, overlapping each other and partly hidden by occluders (each instance at least
half visible). Sizes are log-uniform from 16 to 256 px on 192x192 images (scaled with ``--size``;
the largest are cut by the image border), so objects span from 2 to 24 cells of the c3 map (stride 8)
and up to the whole c5 map (6x6, stride 32), and COCO's own area ranges (small < 32^2 < medium < 96^2
< large, on the visible mask area) all occur: about 51% / 41% / 7% of the instances.
Boxes are each instance's visible extent (COCO convention); ``area`` is its visible mask area.

Splits, each its own random stream seeded by (seed, stream, index), so they are disjoint:

    train       (stream 0)  for training
    val         (stream 1)  for every choice of recipe (learning rate, schedule, ...)
    test        (stream 2)  evaluated once per run; the only split results are reported on
    test_rigid  (stream 3)  the geometry-off control: the same sizes, clutter and occlusion, but no
                            rotation, stretch, shear, articulation or elastic warp
    (stream 4: single-object classification crops for backbone pretraining, ``classification_sample``)

Layout (COCO format, loads with pycocotools and mmdet's ``CocoDataset``)::

    OUT/annotations/instances_<split>.json   OUT/<split>/000000.png ...
    OUT/meta.json     the generation parameters (written last: marks completion)

The same parameters give byte-identical files on any machine with the same OpenCV, and the first N
images of a split do not depend on how many are generated.

    python -m mmdet_dcnv2.datasets.shapes --out data/shapes [--num-train 1600 --num-val 200 ...]
"""

import argparse
import hashlib
import json
import math
import os
from dataclasses import asdict, dataclass
from typing import Dict, List, Optional, Tuple

import numpy as np

CLASSES = ("triangle", "star", "plus", "ell", "ring", "arrow")
SPLITS = ("train", "val", "test", "test_rigid")
STREAMS = {"train": 0, "val": 1, "test": 2, "test_rigid": 3, "classification": 4}
DEFAULT_COUNTS = {"train": 1600, "val": 200, "test": 300, "test_rigid": 300}
DEFAULT_SIZE = 192
VERSION = 3  # bump when the drawing changes: stored in meta.json, so old data is regenerated

_TEMPLATE = 64  # a shape spans about 0.95 of this many template pixels ...
_MARGIN = 24  # ... centred on a canvas this much wider on every side, so bends stay on it


@dataclass(frozen=True)
class Geometry:
    """How far an instance is deformed (each drawn uniformly in +-the given range)."""

    rotate: bool = True  # any angle
    stretch: float = 0.35  # log of the x:y aspect change / 2
    shear: float = 0.35
    bend_degrees: float = 35.0  # articulation about a random hinge line
    elastic: float = 0.06  # displacement amplitude, as a fraction of the template


RIGID = Geometry(rotate=False, stretch=0.0, shear=0.0, bend_degrees=0.0, elastic=0.0)
SPLIT_GEOMETRY = {"train": Geometry(), "val": Geometry(), "test": Geometry(), "test_rigid": RIGID}


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
    """One float32 mask per class (side _TEMPLATE + 2 * _MARGIN), antialiased (drawn at 4x, area-downsampled)."""
    import cv2

    side = _TEMPLATE + 2 * _MARGIN
    big, shift = side * 4, 4
    out = []
    for name in CLASSES:
        canvas = np.zeros((big, big), np.uint8)
        centre, half = big / 2, _TEMPLATE * 4 / 2
        poly = _polygon(name)
        if poly is None:
            point = (int(centre * 16), int(centre * 16))
            cv2.circle(canvas, point, int(0.95 * half * 16), 255, -1, cv2.LINE_AA, shift)
            cv2.circle(canvas, point, int(0.55 * half * 16), 0, -1, cv2.LINE_AA, shift)
        else:
            pts = np.round((poly * 0.95 * half + centre) * (1 << shift)).astype(np.int32)
            cv2.fillPoly(canvas, [pts], 255, cv2.LINE_AA, shift)
        small = cv2.resize(canvas, (side, side), interpolation=cv2.INTER_AREA)
        out.append(small.astype(np.float32) / 255.0)
    return out


def _deform(template: np.ndarray, rng: np.random.Generator, geometry: Geometry) -> np.ndarray:
    """Articulation and elastic warp, in template space (one backward map, one remap).

    Bend: points beyond a random hinge line through the middle half of the shape turn about the
    hinge point, the angle ramping in over a tenth of the template (a joint, not a tear). Elastic: a
    4x4 grid of normal displacements, cubic-upsampled (smooth at the scale of the shape's parts)."""
    import cv2

    t = template.shape[0]
    yy, xx = np.mgrid[0:t, 0:t].astype(np.float32)
    mx, my = xx.copy(), yy.copy()
    angle = math.radians(rng.uniform(-geometry.bend_degrees, geometry.bend_degrees))
    direction = rng.uniform(0.0, 2 * math.pi)
    pivot = t / 2 + rng.uniform(-0.25, 0.25, 2) * _TEMPLATE
    if angle != 0.0:
        nx, ny = math.cos(direction), math.sin(direction)
        side = (xx - pivot[0]) * nx + (yy - pivot[1]) * ny
        ramp = np.clip(side / (0.1 * _TEMPLATE), 0.0, 1.0)
        a = -angle * ramp  # backward map: rotate the destination back onto the source
        c, s = np.cos(a), np.sin(a)
        dx, dy = xx - pivot[0], yy - pivot[1]
        mx, my = (pivot[0] + c * dx - s * dy).astype(np.float32), (pivot[1] + s * dx + c * dy).astype(np.float32)
    amplitude = rng.uniform(0.0, geometry.elastic) * _TEMPLATE
    grid = rng.normal(0.0, 1.0, (2, 4, 4)).astype(np.float32) * amplitude
    mx += cv2.resize(grid[0], (t, t), interpolation=cv2.INTER_CUBIC)
    my += cv2.resize(grid[1], (t, t), interpolation=cv2.INTER_CUBIC)
    return cv2.remap(template, mx, my, cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT, borderValue=0)


def _affine(rng: np.random.Generator, size: float, center: Tuple[float, float], geometry: Geometry) -> np.ndarray:
    """2x3 matrix: template centre -> ``center``, rotation, stretch, shear; the shape spans ~``size``."""
    scale = size / _TEMPLATE
    stretch = rng.uniform(-geometry.stretch, geometry.stretch)
    sx, sy = scale * math.exp(stretch), scale * math.exp(-stretch)
    shear = rng.uniform(-geometry.shear, geometry.shear)
    theta = rng.uniform(0.0, 2 * math.pi) if geometry.rotate else 0.0
    c, s = math.cos(theta), math.sin(theta)
    rotate = np.array([[c, -s], [s, c]])
    linear = rotate @ np.array([[1.0, shear], [0.0, 1.0]]) @ np.diag([sx, sy])
    half = _TEMPLATE / 2 + _MARGIN
    offset = np.array(center) - linear @ np.array([half, half])
    return np.hstack([linear, offset[:, None]]).astype(np.float64)


def _instance(
    rng: np.random.Generator, templates: List[np.ndarray], size: int, extent: float, geometry: Geometry, label: int
) -> np.ndarray:
    """The soft (antialiased) mask of one deformed instance of class ``label`` on a size x size canvas."""
    import cv2

    center = tuple(rng.uniform(0.35 * extent, size - 0.35 * extent, 2))
    warped = _deform(templates[label], rng, geometry)
    return cv2.warpAffine(
        warped,
        _affine(rng, extent, center, geometry),
        (size, size),
        flags=cv2.INTER_LINEAR,
        borderMode=cv2.BORDER_CONSTANT,
        borderValue=0,
    )


def _log_uniform(rng: np.random.Generator, low: float, high: float) -> float:
    return float(math.exp(rng.uniform(math.log(low), math.log(high))))


def _colour(rng: np.random.Generator) -> np.ndarray:
    return rng.uniform(0, 255, 3)


def _contrasting(rng: np.random.Generator, against: np.ndarray) -> np.ndarray:
    """A random colour at least 160 (L1 over RGB) away from ``against``."""
    for _ in range(20):
        colour = _colour(rng)
        if np.abs(colour - against).sum() >= 160:
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
    if rng.random() < 0.3:  # stripes in a second colour
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
    size: int = DEFAULT_SIZE,
    geometry: Geometry = Geometry(),
    max_objects: int = 5,
) -> Tuple[np.ndarray, List[Dict[str, object]]]:
    """One RGB uint8 image and its instances ({'category': index, 'bbox': [x, y, w, h], 'area'})."""
    min_size, max_size = 16.0 * size / DEFAULT_SIZE, 256.0 * size / DEFAULT_SIZE
    image = _background(rng, size)
    _lines(rng, image, int(rng.integers(1, 6)))
    for _ in range(int(rng.integers(0, 3))):  # background blobs (under the objects)
        _paint(image, _blob(rng, size, 0.3 * min_size, 0.5 * max_size), rng)

    full: List[np.ndarray] = []  # binary masks of the annotated instances
    visible: List[np.ndarray] = []
    labels: List[int] = []

    def fits(layer: np.ndarray) -> bool:
        """Adding ``layer`` on top leaves every instance at least half visible."""
        return all((vis & ~layer).sum() >= 0.5 * f.sum() for vis, f in zip(visible, full))

    for _ in range(int(rng.integers(1, max_objects + 1))):
        for _attempt in range(20):
            label = int(rng.integers(len(templates)))
            soft = _instance(rng, templates, size, _log_uniform(rng, min_size, max_size), geometry, label)
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
        soft = _blob(rng, size, 0.3 * min_size, 0.4 * max_size)
        binary = soft > 0.5
        if fits(binary):
            _paint(image, soft, rng)
            visible = [vis & ~binary for vis in visible]
    _lines(rng, image, int(rng.integers(0, 3)))

    image += rng.normal(0.0, 6.0, image.shape)
    image = np.clip(np.round(image), 0, 255).astype(np.uint8)
    instances = []
    for label, vis in zip(labels, visible):
        ys, xs = np.nonzero(vis)
        x0, y0, x1, y1 = int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1
        instances.append({"category": label, "bbox": [x0, y0, x1 - x0, y1 - y0], "area": int(vis.sum())})
    return image, instances


def classification_sample(
    index: int, seed: int = 0, size: int = 112, templates: Optional[List[np.ndarray]] = None
) -> Tuple[np.ndarray, int]:
    """Sample ``index`` of the backbone-pretraining stream (stream 4, disjoint from every split): one
    instance of a random class (24 to 0.9 * size px, full geometric variation) on clutter, partly
    occluded; returns (RGB uint8 image, class index)."""
    rng = np.random.default_rng([seed, STREAMS["classification"], index])
    templates = templates if templates is not None else _templates()
    image = _background(rng, size)
    _lines(rng, image, int(rng.integers(1, 6)))
    if rng.random() < 0.5:
        _paint(image, _blob(rng, size, 8.0, 0.4 * size), rng)
    label = int(rng.integers(len(templates)))
    soft = _instance(rng, templates, size, _log_uniform(rng, 24.0, 0.9 * size), Geometry(), label)
    _paint(image, soft, rng)
    if rng.random() < 0.3:  # a small occluder on top
        _paint(image, _blob(rng, size, 6.0, 0.25 * size), rng)
    image += rng.normal(0.0, 6.0, image.shape)
    return np.clip(np.round(image), 0, 255).astype(np.uint8), label


def _params(counts: Dict[str, int], size: int, seed: int) -> Dict[str, object]:
    return {
        "version": VERSION,
        "classes": list(CLASSES),
        "counts": {split: int(counts[split]) for split in SPLITS},
        "size": size,
        "seed": seed,
        "geometry": {split: asdict(SPLIT_GEOMETRY[split]) for split in SPLITS},
    }


def _counts(counts: Optional[Dict[str, int]]) -> Dict[str, int]:
    merged = dict(DEFAULT_COUNTS, **(counts or {}))
    unknown = sorted(set(merged) - set(SPLITS))
    if unknown:
        raise ValueError(f"counts: unknown split(s) {unknown}; expected some of {list(SPLITS)}")
    for split, count in merged.items():
        if not isinstance(count, int) or count < 1:
            raise ValueError(f"counts[{split!r}] must be a positive integer, got {count!r}")
    return merged


def read_meta(out: str) -> Optional[Dict[str, object]]:
    """The parameters ``out`` was generated with (plus its checksums), or None if it has no meta.json."""
    try:
        with open(os.path.join(out, "meta.json")) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _split_digest(out: str, split: str, count: int) -> str:
    """sha256 over a split's annotation file and its images, in order (missing files raise OSError)."""
    digest = hashlib.sha256()
    with open(os.path.join(out, "annotations", f"instances_{split}.json"), "rb") as f:
        digest.update(f.read())
    for index in range(count):
        with open(os.path.join(out, split, f"{index:06d}.png"), "rb") as f:
            digest.update(f.read())
    return digest.hexdigest()


def is_generated(out: str, counts: Optional[Dict[str, int]] = None, size: int = DEFAULT_SIZE, seed: int = 0) -> bool:
    """Whether ``out``'s meta.json says it was generated with exactly these parameters (and version)."""
    meta = read_meta(out)
    return meta is not None and {k: v for k, v in meta.items() if k != "checksums"} == _params(
        _counts(counts), size, seed
    )


def check(out: str, counts: Optional[Dict[str, int]] = None, size: int = DEFAULT_SIZE, seed: int = 0) -> str:
    """How ``out`` stands: "missing" (absent or empty: safe to generate into), "ok" (complete, these
    parameters, every file matching its checksum); anything else raises DatasetError saying what is
    wrong, so that nothing is overwritten."""
    counts = _counts(counts)  # bad arguments first
    if not os.path.isdir(out) or not os.listdir(out):
        return "missing"
    meta = read_meta(out)
    if meta is None:
        raise DatasetError(
            f"{out} is not empty but has no readable meta.json: an interrupted generation or other files. "
            f"Remove it, or regenerate with `python -P -m mmdet_dcnv2.datasets.shapes --out {out} --force`."
        )
    if not is_generated(out, counts, size, seed):
        wanted = _params(_counts(counts), size, seed)
        differs = sorted(k for k in wanted if meta.get(k) != wanted[k])
        raise DatasetError(
            f"{out} holds a shapes dataset generated with other parameters ({', '.join(differs)} differ; "
            f"version {meta.get('version')} there, {VERSION} wanted). Pass another --data-root, or "
            f"regenerate it with `python -P -m mmdet_dcnv2.datasets.shapes --out {out} --force` "
            "(with the same counts/size/seed)."
        )
    for split, expected in (meta.get("checksums") or {}).items():
        try:
            actual = _split_digest(out, split, meta["counts"][split])
        except OSError as error:
            raise DatasetError(f"{out}: the {split} split is incomplete ({error}); regenerate with --force") from None
        if actual != expected:
            raise DatasetError(
                f"{out}: the {split} split does not match its checksum in meta.json (files changed or "
                "corrupt); regenerate with `python -P -m mmdet_dcnv2.datasets.shapes --force`"
            )
    return "ok"


class DatasetError(RuntimeError):
    """A dataset directory that cannot be used as it is (the message says why and what to do)."""


def generate(
    out: str,
    counts: Optional[Dict[str, int]] = None,
    size: int = DEFAULT_SIZE,
    seed: int = 0,
    verbose: bool = False,
) -> str:
    """Write the dataset under ``out`` (see the module docstring); returns ``out``.

    ``counts``: images per split, e.g. ``{"train": 1600}`` (the others keep DEFAULT_COUNTS)."""
    import cv2

    counts = _counts(counts)
    if size < 64:
        raise ValueError(f"size must be at least 64 pixels, got {size}")
    meta = os.path.join(out, "meta.json")
    if os.path.exists(meta):
        os.remove(meta)
    templates = _templates()
    categories = [{"id": i + 1, "name": name, "supercategory": "shape"} for i, name in enumerate(CLASSES)]
    os.makedirs(os.path.join(out, "annotations"), exist_ok=True)
    for split in SPLITS:
        os.makedirs(os.path.join(out, split), exist_ok=True)
        images, annotations = [], []
        for index in range(counts[split]):
            rng = np.random.default_rng([seed, STREAMS[split], index])
            image, instances = draw_image(rng, templates, size=size, geometry=SPLIT_GEOMETRY[split])
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
            print(f"shapes: {counts[split]} {split} images, {len(annotations)} instances -> {os.path.join(out, split)}")
    params = _params(counts, size, seed)
    params["checksums"] = {split: _split_digest(out, split, counts[split]) for split in SPLITS}
    with open(meta, "w") as f:
        json.dump(params, f, indent=1)
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="data/shapes", help="output directory (default: data/shapes)")
    for split in SPLITS:
        flag = "--num-" + split.replace("_", "-")
        parser.add_argument(flag, type=int, default=DEFAULT_COUNTS[split], help=f"{split} images")
    parser.add_argument("--size", type=int, default=DEFAULT_SIZE, help="image side in pixels")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--force", action="store_true", help="regenerate even if already complete")
    args = parser.parse_args(argv)
    counts = {split: getattr(args, "num_" + split) for split in SPLITS}
    try:
        done = not args.force and is_generated(args.out, counts, args.size, args.seed)
        if done:
            print(f"shapes: {args.out} is already generated with these parameters")
            return
        generate(args.out, counts, args.size, args.seed, verbose=True)
    except ValueError as error:
        parser.error(str(error))


if __name__ == "__main__":
    main()
