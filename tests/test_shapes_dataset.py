"""The embedded shapes dataset: deterministic, COCO-loadable, sane boxes, CocoDataset-readable."""

import filecmp
import json
import os

import numpy as np
import pytest

from mmdet_dcnv2.datasets import shapes


def _files(root):
    return sorted(os.path.relpath(os.path.join(d, f), root) for d, _, fs in os.walk(root) for f in fs)


def test_generation_is_deterministic_and_prefix_stable(tmp_path):
    a = shapes.generate(str(tmp_path / "a"), num_train=6, num_val=3, seed=3)
    b = shapes.generate(str(tmp_path / "b"), num_train=6, num_val=3, seed=3)
    assert _files(a) == _files(b)
    for name in _files(a):
        assert filecmp.cmp(os.path.join(a, name), os.path.join(b, name), shallow=False), name
    # Image i of a split depends on (seed, split, i) only, not on how many are generated.
    c = shapes.generate(str(tmp_path / "c"), num_train=3, num_val=1, seed=3)
    assert filecmp.cmp(os.path.join(a, "train", "000002.png"), os.path.join(c, "train", "000002.png"), shallow=False)
    d = shapes.generate(str(tmp_path / "d"), num_train=3, num_val=1, seed=4)
    assert not filecmp.cmp(
        os.path.join(c, "train", "000000.png"), os.path.join(d, "train", "000000.png"), shallow=False
    )


def test_output_loads_in_pycocotools_with_valid_boxes(tmp_path):
    from pycocotools.coco import COCO

    root = shapes.generate(str(tmp_path / "s"), num_train=12, num_val=4, seed=0)
    assert shapes.is_generated(root, num_train=12, num_val=4, seed=0)
    assert not shapes.is_generated(root, num_train=13, num_val=4, seed=0)
    import cv2

    seen = set()
    for split, count in (("train", 12), ("val", 4)):
        coco = COCO(os.path.join(root, "annotations", f"instances_{split}.json"))
        assert [c["name"] for c in coco.loadCats(coco.getCatIds())] == list(shapes.CLASSES)
        assert len(coco.getImgIds()) == count
        assert len(coco.getAnnIds()) >= count  # at least one instance per image on average
        for image in coco.loadImgs(coco.getImgIds()):
            pixels = cv2.imread(os.path.join(root, split, image["file_name"]))
            assert pixels.shape == (image["height"], image["width"], 3) == (128, 128, 3)
            for ann in coco.loadAnns(coco.getAnnIds(imgIds=image["id"])):
                x, y, w, h = ann["bbox"]
                assert 0 <= x and 0 <= y and w > 0 and h > 0 and x + w <= 128 and y + h <= 128
                assert 0 < ann["area"] <= w * h and ann["iscrowd"] == 0
                seen.add(ann["category_id"])
    assert len(seen) >= 4  # several classes appear even in a handful of images


def test_cli_generates_once(tmp_path, capsys):
    out = str(tmp_path / "cli")
    shapes.main(["--out", out, "--num-train", "2", "--num-val", "1"])
    stamp = os.path.getmtime(os.path.join(out, "meta.json"))
    shapes.main(["--out", out, "--num-train", "2", "--num-val", "1"])
    assert "already generated" in capsys.readouterr().out
    assert os.path.getmtime(os.path.join(out, "meta.json")) == stamp
    with open(os.path.join(out, "meta.json")) as f:
        assert json.load(f)["classes"] == list(shapes.CLASSES)


def test_mmdet_coco_dataset_reads_it(tmp_path):
    pytest.importorskip("mmdet")
    from mmdet.datasets import CocoDataset

    root = shapes.generate(str(tmp_path / "s"), num_train=4, num_val=2)
    dataset = CocoDataset(
        data_root=root,
        ann_file="annotations/instances_val.json",
        data_prefix=dict(img="val/"),
        metainfo=dict(classes=shapes.CLASSES),
        pipeline=[],
        test_mode=True,
    )
    assert len(dataset) == 2
    info = dataset[0]
    assert info["img_path"].endswith(os.path.join("val", "000000.png"))
    labels = np.array([inst["bbox_label"] for inst in info["instances"]])
    assert labels.min() >= 0 and labels.max() < len(shapes.CLASSES)
