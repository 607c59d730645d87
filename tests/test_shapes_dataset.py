"""The shapes benchmark's data: deterministic, disjoint splits, a geometry-off control, COCO-loadable,
checked before use (never overwritten)."""

import filecmp
import hashlib
import json
import os

import numpy as np
import pytest

from mmdet_dcnv2.datasets import shapes

SMALL = {"train": 6, "val": 3, "test": 3, "test_rigid": 3}


def _files(root):
    return sorted(os.path.relpath(os.path.join(d, f), root) for d, _, fs in os.walk(root) for f in fs)


def test_generation_is_deterministic_and_prefix_stable(tmp_path):
    a = shapes.generate(str(tmp_path / "a"), SMALL, seed=3)
    b = shapes.generate(str(tmp_path / "b"), SMALL, seed=3)
    assert _files(a) == _files(b)
    for name in _files(a):
        assert filecmp.cmp(os.path.join(a, name), os.path.join(b, name), shallow=False), name
    # Image i of a split depends on (seed, split, i) only, not on how many are generated.
    c = shapes.generate(str(tmp_path / "c"), {"train": 3, "val": 1, "test": 1, "test_rigid": 1}, seed=3)
    for split in shapes.SPLITS:
        assert filecmp.cmp(os.path.join(a, split, "000000.png"), os.path.join(c, split, "000000.png"), shallow=False)
    d = shapes.generate(str(tmp_path / "d"), {"train": 1, "val": 1, "test": 1, "test_rigid": 1}, seed=4)
    assert not filecmp.cmp(os.path.join(c, "train", "000000.png"), os.path.join(d, "train", "000000.png"))


def test_splits_are_disjoint_streams(tmp_path):
    root = shapes.generate(str(tmp_path / "s"), {"train": 20, "val": 8, "test": 8, "test_rigid": 8})
    digests = {}
    for split in shapes.SPLITS:
        for name in sorted(os.listdir(os.path.join(root, split))):
            with open(os.path.join(root, split, name), "rb") as f:
                digest = hashlib.sha256(f.read()).hexdigest()
            assert digest not in digests, f"{split}/{name} repeats {digests.get(digest)}"
            digests[digest] = f"{split}/{name}"
    # Every split and the pretraining stream draw from their own seed sequence.
    assert len(set(shapes.STREAMS.values())) == len(shapes.STREAMS)
    assert set(shapes.SPLITS) < set(shapes.STREAMS)
    # The classification stream's images are none of the splits' images either.
    image, label = shapes.classification_sample(0, size=shapes.DEFAULT_SIZE)
    assert 0 <= label < len(shapes.CLASSES) and image.shape == (shapes.DEFAULT_SIZE, shapes.DEFAULT_SIZE, 3)


def test_geometry_off_split_has_no_deformation():
    assert shapes.SPLIT_GEOMETRY["test_rigid"] == shapes.RIGID
    assert all(shapes.SPLIT_GEOMETRY[s] == shapes.Geometry() for s in ("train", "val", "test"))
    rng = np.random.default_rng(0)
    template = shapes._templates()[2]
    # Neither articulation nor elastic warp moves a pixel, and the affine map is a pure scale.
    np.testing.assert_allclose(shapes._deform(template, rng, shapes.RIGID), template, atol=1e-6)
    linear = shapes._affine(rng, 64.0, (96.0, 96.0), shapes.RIGID)[:, :2]
    np.testing.assert_allclose(linear, np.eye(2), atol=1e-12)
    # The deforming geometry does move pixels (the control differs from the benchmark).
    assert np.abs(shapes._deform(template, np.random.default_rng(1), shapes.Geometry()) - template).max() > 0.5


def test_output_loads_in_pycocotools_with_valid_boxes_and_all_area_ranges(tmp_path):
    from pycocotools.coco import COCO

    counts = {"train": 40, "val": 2, "test": 2, "test_rigid": 2}
    root = shapes.generate(str(tmp_path / "s"), counts, seed=0)
    assert shapes.is_generated(root, counts, seed=0)
    assert not shapes.is_generated(root, dict(counts, train=41), seed=0)
    import cv2

    seen, areas = set(), []
    size = shapes.DEFAULT_SIZE
    for split, count in counts.items():
        coco = COCO(os.path.join(root, "annotations", f"instances_{split}.json"))
        assert [c["name"] for c in coco.loadCats(coco.getCatIds())] == list(shapes.CLASSES)
        assert len(coco.getImgIds()) == count
        for image in coco.loadImgs(coco.getImgIds()):
            pixels = cv2.imread(os.path.join(root, split, image["file_name"]))
            assert pixels.shape == (image["height"], image["width"], 3) == (size, size, 3)
            for ann in coco.loadAnns(coco.getAnnIds(imgIds=image["id"])):
                x, y, w, h = ann["bbox"]
                assert 0 <= x and 0 <= y and w > 0 and h > 0 and x + w <= size and y + h <= size
                assert 0 < ann["area"] <= w * h and ann["iscrowd"] == 0
                seen.add(ann["category_id"])
                areas.append(ann["area"])
    assert len(seen) == len(shapes.CLASSES)
    areas = np.array(areas)
    # COCO's small / medium / large ranges all occur (the benchmark reports AP_S/M/L).
    assert (areas < 32**2).any() and ((areas >= 32**2) & (areas < 96**2)).any() and (areas >= 96**2).any()


def test_check_refuses_other_or_damaged_data_and_overwrites_nothing(tmp_path):
    root = str(tmp_path / "s")
    assert shapes.check(root, SMALL) == "missing"
    shapes.generate(root, SMALL)
    assert shapes.check(root, SMALL) == "ok"
    with pytest.raises(shapes.DatasetError, match="other parameters.*counts"):
        shapes.check(root, dict(SMALL, train=7))
    image = os.path.join(root, "test", "000001.png")
    with open(image, "r+b") as f:
        f.seek(100)
        f.write(b"\x00\x01\x02")
    before = _files(root)
    with pytest.raises(shapes.DatasetError, match="test split does not match its checksum"):
        shapes.check(root, SMALL)
    os.remove(image)
    with pytest.raises(shapes.DatasetError, match="test split is incomplete"):
        shapes.check(root, SMALL)
    os.remove(os.path.join(root, "meta.json"))
    with pytest.raises(shapes.DatasetError, match="no readable meta.json"):
        shapes.check(root, SMALL)
    assert set(_files(root)) <= set(before)
    with pytest.raises(ValueError, match="unknown split"):
        shapes.check(root, {"training": 3})
    with pytest.raises(ValueError, match=r"counts\['val'\] must be a positive integer"):
        shapes.generate(str(tmp_path / "t"), {"val": 0})


def test_cli_generates_once(tmp_path, capsys):
    out = str(tmp_path / "cli")
    args = ["--out", out, "--num-train", "2", "--num-val", "1", "--num-test", "1", "--num-test-rigid", "1"]
    shapes.main(args)
    stamp = os.path.getmtime(os.path.join(out, "meta.json"))
    shapes.main(args)
    assert "already generated" in capsys.readouterr().out
    assert os.path.getmtime(os.path.join(out, "meta.json")) == stamp
    with open(os.path.join(out, "meta.json")) as f:
        meta = json.load(f)
    assert meta["classes"] == list(shapes.CLASSES) and set(meta["checksums"]) == set(shapes.SPLITS)


def test_mmdet_coco_dataset_reads_it(tmp_path):
    pytest.importorskip("mmdet")
    from mmdet.datasets import CocoDataset

    root = shapes.generate(str(tmp_path / "s"), {"train": 2, "val": 2, "test": 1, "test_rigid": 1})
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
