"""mmdet_dcnv2.evaluation.coco_bootstrap against pycocotools itself (numpy + pycocotools only)."""

import contextlib
import copy
import io

import numpy as np
import pytest

pytest.importorskip("pycocotools")
from pycocotools.coco import COCO  # noqa: E402
from pycocotools.cocoeval import COCOeval  # noqa: E402

from mmdet_dcnv2.evaluation.coco_bootstrap import (  # noqa: E402
    COMPARISON_METRICS,
    METRICS,
    ImageLevelEval,
    _PrecisionKernel,
    _t_quantile_closed_form,
    class_correct_recall,
    coco_metrics,
    evaluate_runs,
    format_comparison,
    paired_comparison,
    t_quantile,
)

MMDET_MAX_DETS = (100, 300, 1000)


def make_gt(seed, num_images=14, crowd=True, sizes=((6, 30), (34, 94), (100, 220)), id_step=10):
    """COCO GT dict: categories 1-3 with boxes of all three COCO area ranges, category 4 without GT."""
    rng = np.random.default_rng(seed)
    images = [
        {"id": id_step * (i + 1), "width": 640, "height": 640, "file_name": f"{i}.png"} for i in range(num_images)
    ]
    anns = []
    for img in images:
        for _ in range(rng.integers(0, 7)):
            lo, hi = sizes[rng.integers(len(sizes))]
            s = rng.uniform(lo, hi)
            w, h = s * rng.uniform(0.8, 1.25), s * rng.uniform(0.8, 1.25)
            x, y = rng.uniform(0, 640 - w), rng.uniform(0, 640 - h)
            anns.append(
                {
                    "id": len(anns) + 1,
                    "image_id": img["id"],
                    "category_id": int(rng.integers(1, 4)),
                    "bbox": [x, y, w, h],
                    "area": w * h,
                    "iscrowd": int(crowd and rng.random() < 0.08),
                }
            )
    cats = [{"id": c, "name": f"c{c}"} for c in (1, 2, 3, 4)]
    return {"images": images, "annotations": anns, "categories": cats}


def make_dets(gt, seed, quality=1.0, empty_images=2, score_grid=0.05):
    """Detections: jittered GT copies (some duplicated, some wrong class), false positives, category 4 boxes.

    Scores on a coarse grid so equal scores occur inside one image and category (the ordering corner case).
    quality < 1 degrades the boxes and the scores.
    """
    rng = np.random.default_rng(seed)
    by_img = {}
    for a in gt["annotations"]:
        by_img.setdefault(a["image_id"], []).append(a)
    skip = {img["id"] for img in gt["images"][:empty_images]}
    dets = []

    def score(good):
        s = rng.uniform(0.4, 1.0) if good else rng.uniform(0.0, 0.7)
        s = s * quality + (1 - quality) * rng.uniform(0, 1)
        return float(np.clip(np.round(s / score_grid) * score_grid, 0.0, 1.0))

    for img in gt["images"]:
        if img["id"] in skip:
            continue
        for a in by_img.get(img["id"], []):
            s_gt = score(True)  # a duplicate box of one GT gets the same score: equal scores in one image
            for _ in range(rng.choice([0, 1, 1, 1, 2])):
                x, y, w, h = a["bbox"]
                j = rng.uniform(0, 0.25) / max(quality, 0.05)
                box = [x + rng.normal(0, j * w), y + rng.normal(0, j * h), w * (1 + rng.normal(0, j)), h]
                box[2] = max(box[2], 1.0)
                cat = a["category_id"] if rng.random() < 0.9 else int(rng.integers(1, 4))
                dets.append({"image_id": img["id"], "category_id": cat, "bbox": box, "score": s_gt})
        for _ in range(rng.integers(0, 4)):
            w, h = rng.uniform(5, 150, size=2)
            box = [float(rng.uniform(0, 640 - w)), float(rng.uniform(0, 640 - h)), float(w), float(h)]
            dets.append(
                {"image_id": img["id"], "category_id": int(rng.integers(1, 5)), "bbox": box, "score": score(False)}
            )
    return dets


def cocoeval_stats(gt, dets, max_dets=MMDET_MAX_DETS):
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO()
        coco.dataset = copy.deepcopy(gt)
        coco.createIndex()
        res = coco.loadRes(copy.deepcopy(dets))
        e = COCOeval(coco, res, "bbox")
        e.params.maxDets = list(max_dets)
        e.evaluate()
        e.accumulate()
        e.summarize()
    return dict(zip(METRICS, e.stats[:6]))


def duplicate(gt, dets, weights, id_step):
    """GT and detections with image i repeated weights[i] times under new ids that sort next to the original."""
    images, anns, new_dets = [], [], []
    by_img_gt, by_img_dt = {}, {}
    for a in gt["annotations"]:
        by_img_gt.setdefault(a["image_id"], []).append(a)
    for d in dets:
        by_img_dt.setdefault(d["image_id"], []).append(d)
    for img, w in zip(sorted(gt["images"], key=lambda im: im["id"]), weights):
        for c in range(int(w)):
            new_id = img["id"] * id_step + c
            images.append(dict(img, id=new_id))
            for a in by_img_gt.get(img["id"], []):
                anns.append(dict(a, id=len(anns) + 1, image_id=new_id))
            new_dets += [dict(d, image_id=new_id) for d in by_img_dt.get(img["id"], [])]
    return {"images": images, "annotations": anns, "categories": gt["categories"]}, new_dets


def assert_metrics_equal(ours, ref):
    for m in METRICS:
        assert abs(ours[m] - ref[m]) <= 1e-12, (m, ours[m], ref[m])


@pytest.mark.parametrize("crowd", [False, True])
@pytest.mark.parametrize("max_dets", [MMDET_MAX_DETS, (1, 10, 100)])
def test_weights_of_one_equal_cocoeval_stats(crowd, max_dets):
    gt = make_gt(1, crowd=crowd)
    dets = make_dets(gt, 2)
    ours = coco_metrics(ImageLevelEval(gt, dets, max_dets=max_dets))
    ref = cocoeval_stats(gt, dets, max_dets)
    assert_metrics_equal(ours, ref)
    assert all(ref[m] > 0 for m in METRICS)  # every area range and IoU has data: the comparison is not vacuous


def test_data_has_the_corner_cases():
    """The synthetic set covers what the exactness tests claim to cover."""
    gt = make_gt(1)
    dets = make_dets(gt, 2)
    ev = ImageLevelEval(gt, dets)
    areas = np.array([a["area"] for a in gt["annotations"]])
    assert (areas < 32**2).any() and ((areas > 32**2) & (areas < 96**2)).any() and (areas > 96**2).any()
    assert any(a["iscrowd"] for a in gt["annotations"])
    with_dets = {d["image_id"] for d in dets}
    assert any(img["id"] not in with_dets for img in gt["images"])
    assert ev.num_pos[list(ev.cat_ids).index(4)].sum() == 0 and any(d["category_id"] == 4 for d in dets)
    # equal scores within one image and category, so the copy-major reordering under repeats is exercised
    assert _PrecisionKernel([ev], 0, list(range(10)), 100).has_ties


def test_metric_minus_one_where_cocoeval_gives_minus_one():
    gt = make_gt(3, sizes=((6, 30), (34, 70)))  # no large objects: AP_l is -1 in COCO
    dets = make_dets(gt, 4)
    ours = coco_metrics(ImageLevelEval(gt, dets))
    ref = cocoeval_stats(gt, dets)
    assert ref["AP_l"] == -1 and ours["AP_l"] == -1
    assert_metrics_equal(ours, ref)


def test_max_dets_cut_like_cocoeval():
    """AP is read at 100 detections per image, AP50 ... AP_l at max_dets[2] (mmdet's bbox_mAP vs bbox_mAP_50)."""
    gt = make_gt(5)
    dets = make_dets(gt, 6)
    img = gt["images"][-1]["id"]
    rng = np.random.default_rng(0)
    for _ in range(150):  # one image and category with more than 100 detections
        dets.append({"image_id": img, "category_id": 1, "bbox": [*rng.uniform(0, 300, 2), 40, 40], "score": 0.9})
    ours = coco_metrics(ImageLevelEval(gt, dets))
    ref = cocoeval_stats(gt, dets)
    assert_metrics_equal(ours, ref)
    ref100 = cocoeval_stats(gt, dets, (10, 50, 100))
    assert ref100["AP50"] != ref["AP50"]  # the cut matters for these data


@pytest.mark.parametrize("draw", range(3))
def test_resample_equals_cocoeval_on_duplicated_images(draw):
    gt = make_gt(7)
    dets = make_dets(gt, 8)
    ev = ImageLevelEval(gt, dets)
    rng = np.random.default_rng(draw)
    n = ev.num_images
    w = np.bincount(rng.integers(0, n, size=n), minlength=n)
    assert w.max() >= 2 and (w == 0).any()
    gt_dup, dets_dup = duplicate(gt, dets, w, id_step=10)
    assert_metrics_equal(coco_metrics(ev, w), cocoeval_stats(gt_dup, dets_dup))


def test_resample_with_large_multiplicities():
    gt = make_gt(9, num_images=6)
    dets = make_dets(gt, 10, empty_images=1)
    ev = ImageLevelEval(gt, dets)
    w = np.array([0, 5, 1, 0, 3, 7])
    gt_dup, dets_dup = duplicate(gt, dets, w, id_step=10)
    assert_metrics_equal(coco_metrics(ev, w), cocoeval_stats(gt_dup, dets_dup))


def test_bad_image_weights():
    gt = make_gt(1)
    ev = ImageLevelEval(gt, make_dets(gt, 2))
    with pytest.raises(ValueError, match="image_weights"):
        coco_metrics(ev, np.ones(ev.num_images + 1))
    with pytest.raises(ValueError, match="image_weights"):
        coco_metrics(ev, np.full(ev.num_images, 0.5))
    with pytest.raises(ValueError, match="image_weights"):
        coco_metrics(ev, -np.ones(ev.num_images, dtype=int))


def test_bad_max_dets():
    gt = make_gt(1)
    with pytest.raises(ValueError, match="max_dets"):
        ImageLevelEval(gt, [], max_dets=(10, 300, 1000))


def test_empty_detections_give_zero_ap():
    gt = make_gt(1)
    ours = coco_metrics(ImageLevelEval(gt, []))
    assert all(ours[m] == 0 for m in METRICS)
    assert class_correct_recall(ImageLevelEval(gt, []))["matched"] == 0


# --- class-correct recall ------------------------------------------------------------------------------


def one_image_gt(boxes):
    """boxes: (category, [x, y, w, h], iscrowd)."""
    anns = [
        {"id": i + 1, "image_id": 1, "category_id": c, "bbox": b, "area": b[2] * b[3], "iscrowd": crowd}
        for i, (c, b, crowd) in enumerate(boxes)
    ]
    return {
        "images": [{"id": 1, "width": 200, "height": 200}],
        "annotations": anns,
        "categories": [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}],
    }


def det(cat, box, score):
    return {"image_id": 1, "category_id": cat, "bbox": box, "score": score}


def test_recall_hand_made_cases():
    gt = one_image_gt(
        [
            (1, [0, 0, 10, 10], 0),  # found by a right-class box at IoU 0.501
            (1, [50, 50, 10, 10], 0),  # only IoU 0.499
            (2, [100, 100, 10, 10], 0),  # only a wrong-class perfect box
            (2, [150, 0, 10, 10], 0),  # perfect box, score 0.49
            (1, [0, 150, 10, 10], 0),  # perfect box, score exactly 0.5
            (1, [100, 0, 40, 40], 1),  # crowd: not counted, even when covered
        ]
    )
    dets = [
        det(1, [0, 0, 10, 5.01], 0.9),
        det(1, [50, 50, 10, 4.99], 0.9),
        det(1, [100, 100, 10, 10], 0.95),
        det(2, [150, 0, 10, 10], 0.49),
        det(1, [0, 150, 10, 10], 0.5),
        det(1, [100, 0, 40, 40], 0.99),
    ]
    out = class_correct_recall(gt, dets)
    assert (out["matched"], out["total"]) == (2, 5)
    assert out["recall"] == pytest.approx(0.4)
    # lower score threshold: the 0.49 box counts; the IoU 0.499 box counts at IoU 0.45 (not a COCO threshold)
    assert class_correct_recall(gt, dets, score_thr=0.4)["matched"] == 3
    assert class_correct_recall(gt, dets, iou_thr=0.45)["matched"] == 3
    # from an ImageLevelEval: same; a threshold it did not evaluate is refused, naming it
    ev = ImageLevelEval(gt, dets)
    assert class_correct_recall(ev)["matched"] == 2
    with pytest.raises(ValueError, match="iou_thr=0.45"):
        class_correct_recall(ev, iou_thr=0.45)


def test_recall_one_detection_matches_one_gt():
    """Greedy: the higher-scoring box takes the GT; a second box on the same GT is a duplicate, not a match."""
    gt = one_image_gt([(1, [0, 0, 10, 10], 0), (1, [3, 0, 10, 10], 0)])
    # both boxes overlap GT 1 best (IoU 1 and 0.82); GT 1 taken, the 0.8 box falls to GT 2 (IoU 0.67)
    dets = [det(1, [0, 0, 10, 10], 0.9), det(1, [1, 0, 10, 10], 0.8)]
    assert class_correct_recall(gt, dets)["matched"] == 2
    # a second copy of the first box overlaps GT 2 at 0.54 only: a match too; with GT 2 further away, none
    dets = [det(1, [0, 0, 10, 10], 0.9), det(1, [0, 0, 10, 10], 0.8)]
    assert class_correct_recall(gt, dets)["matched"] == 2
    gt = one_image_gt([(1, [0, 0, 10, 10], 0), (1, [5, 0, 10, 10], 0)])
    assert class_correct_recall(gt, dets)["matched"] == 1


def brute_force_recall(gt, dets, score_thr, iou_thr):
    """Independent greedy matcher: per image and class, boxes by score take the best-IoU free non-crowd GT."""

    def iou(a, b):
        ix = max(0.0, min(a[0] + a[2], b[0] + b[2]) - max(a[0], b[0]))
        iy = max(0.0, min(a[1] + a[3], b[1] + b[3]) - max(a[1], b[1]))
        inter = ix * iy
        return inter / (a[2] * a[3] + b[2] * b[3] - inter)

    matched = total = 0
    for img in gt["images"]:
        for cat in {c["id"] for c in gt["categories"]}:
            g = [a for a in gt["annotations"] if a["image_id"] == img["id"] and a["category_id"] == cat]
            regular = [a for a in g if not a["iscrowd"]]
            total += len(regular)
            d = [x for x in dets if x["image_id"] == img["id"] and x["category_id"] == cat]
            d = sorted(d, key=lambda x: -x["score"])  # stable, like COCO's mergesort
            free = [True] * len(regular)
            for x in d:
                best, m = min(iou_thr, 1 - 1e-10), -1
                for j, a in enumerate(regular):
                    v = iou(x["bbox"], a["bbox"])
                    if free[j] and v >= best:
                        best, m = v, j
                if m >= 0:
                    free[m] = False
                    matched += x["score"] >= score_thr
    return matched, total


@pytest.mark.parametrize("score_thr,iou_thr", [(0.5, 0.5), (0.3, 0.75), (0.7, 0.6)])
def test_recall_matches_independent_greedy_matcher(score_thr, iou_thr):
    gt = make_gt(11, num_images=8)
    dets = make_dets(gt, 12, score_grid=1e-6)  # equal scores only for duplicates: both keep list order
    out = class_correct_recall(gt, dets, score_thr=score_thr, iou_thr=iou_thr)
    assert (out["matched"], out["total"]) == brute_force_recall(gt, dets, score_thr, iou_thr)
    assert 0 < out["matched"] < out["total"]


def test_recall_image_weights_count_images():
    gt = make_gt(11, num_images=8)
    ev = ImageLevelEval(gt, make_dets(gt, 12))
    base = class_correct_recall(ev)
    w = np.arange(ev.num_images) % 3
    out = class_correct_recall(ev, image_weights=w)
    assert out["matched"] == base["matched_per_image"] @ w and out["total"] == base["total_per_image"] @ w
    gt_dup, _ = duplicate(gt, [], w, id_step=10)
    assert out["total"] == sum(1 for a in gt_dup["annotations"] if not a["iscrowd"])


# --- paired comparison ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def arms():
    """3 seeds; arm B's detections are good, arm A's degraded (worse boxes and scores)."""
    gt = make_gt(20, num_images=40)
    coco = COCO()
    coco.dataset = gt
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    runs_b = evaluate_runs(coco, {s: make_dets(gt, 100 + s) for s in range(3)})
    runs_a = evaluate_runs(coco, {s: make_dets(gt, 200 + s, quality=0.45) for s in range(3)})
    return runs_a, runs_b


def test_paired_comparison_is_deterministic(arms):
    runs_a, runs_b = arms
    r1 = paired_comparison(runs_a, runs_b, num_resamples=50, rng_seed=3)
    r2 = paired_comparison(runs_a, runs_b, num_resamples=50, rng_seed=3)
    r3 = paired_comparison(runs_a, runs_b, num_resamples=50, rng_seed=4)
    assert r1 == r2
    assert r1["bootstrap_interval"] != r3["bootstrap_interval"]


def test_identical_arms_give_zero(arms):
    _, runs_b = arms
    r = paired_comparison(runs_b, dict(runs_b), metric="AP50", num_resamples=30)
    assert r["mean_diff"] == 0 and r["bootstrap_interval"] == (0.0, 0.0) and r["ties"] == 3
    assert r["t_interval"] == (0.0, 0.0) and r["combined_interval"] == (0.0, 0.0)


@pytest.mark.parametrize("metric", ["AP", "recall"])
def test_better_arm_gives_interval_above_zero(arms, metric):
    runs_a, runs_b = arms
    r = paired_comparison(runs_a, runs_b, metric=metric, num_resamples=200)
    assert r["seeds"] == [0, 1, 2] and r["wins"] == 3
    for key in ("t_interval", "bootstrap_interval", "combined_interval"):
        lo, hi = r[key]
        assert 0 < lo < r["mean_diff"] < hi, key
    # the combined interval is at least as wide as the t-interval (it adds the bootstrap variance)
    assert r["combined_interval"][1] - r["combined_interval"][0] >= r["t_interval"][1] - r["t_interval"][0]
    # per-seed values are the full-test-set metrics
    if metric == "AP":
        assert r["a"][1] == coco_metrics(runs_a[1])["AP"] and r["b"][2] == coco_metrics(runs_b[2])["AP"]
    else:
        assert r["a"][0] == class_correct_recall(runs_a[0])["recall"]
    assert r["t_quantile"] == pytest.approx(4.302652729749464, abs=1e-9)


def test_bootstrap_replicates_are_paired_exact_metrics(arms):
    """The first replicate equals the mean over seeds of (B - A) recomputed from scratch on the same multiset."""
    runs_a, runs_b = arms
    r = paired_comparison(runs_a, runs_b, metric="AP_m", num_resamples=2, rng_seed=5)
    n = runs_a[0].num_images
    rng = np.random.default_rng(5)
    ws = [np.bincount(rng.integers(0, n, size=n), minlength=n) for _ in range(2)]
    reps = [
        np.mean([coco_metrics(runs_b[s], w)["AP_m"] - coco_metrics(runs_a[s], w)["AP_m"] for s in range(3)]) for w in ws
    ]
    assert r["bootstrap_interval"][0] == pytest.approx(np.quantile(reps, 0.025), abs=1e-12)
    assert r["bootstrap_se"] == pytest.approx(np.std(reps, ddof=1), abs=1e-12)


def test_one_seed_reports_bootstrap_only(arms):
    runs_a, runs_b = arms
    r = paired_comparison({0: runs_a[0]}, {0: runs_b[0]}, num_resamples=20)
    assert r["t_interval"] is None and r["combined_interval"] is None and r["sd_diff"] is None
    assert "unknown" in r["note"]
    text = format_comparison(r)
    assert "seed spread unknown" in text and "n/a" in text


def test_mismatched_seeds_and_bad_metric(arms):
    runs_a, runs_b = arms
    with pytest.raises(ValueError, match=r"only in runs_a: 2; only in runs_b: 7"):
        paired_comparison(runs_a, {0: runs_b[0], 1: runs_b[1], 7: runs_b[2]})
    with pytest.raises(ValueError, match="AP, AP50, AP75, AP_s, AP_m, AP_l, recall; got 'mAP'"):
        paired_comparison(runs_a, runs_b, metric="mAP")
    assert COMPARISON_METRICS == METRICS + ("recall",)


def test_different_test_sets_refused(arms):
    runs_a, _ = arms
    gt = make_gt(21, num_images=40)
    other = {s: ImageLevelEval(gt, make_dets(gt, s)) for s in range(3)}
    with pytest.raises(ValueError, match="same test set"):
        paired_comparison(runs_a, other, num_resamples=2)


def test_format_comparison_lists_every_seed(arms):
    runs_a, runs_b = arms
    r = paired_comparison(runs_a, runs_b, num_resamples=20)
    text = format_comparison(r)
    for s, d in zip(r["seeds"], r["diff"]):
        assert f"| {s} |" in text and f"{d * 100:+.2f}" in text
    assert "mean ± SD" in text and "combined (approximate)" in text and "B better than A on 3 of 3 seeds" in text
    assert "t = 4.30" in text


@pytest.mark.parametrize("confidence", [0.8, 0.9, 0.95, 0.99])
@pytest.mark.parametrize("df", [1, 2, 3, 4, 7, 10, 29, 30, 31, 120])
def test_t_quantile_closed_form_matches_scipy(confidence, df):
    stats = pytest.importorskip("scipy.stats")
    expected = stats.t.ppf((1 + confidence) / 2, df)
    assert _t_quantile_closed_form(confidence, df) == pytest.approx(expected, rel=1e-10)
    assert t_quantile(confidence, df) == pytest.approx(expected, rel=1e-12)


def test_t_quantile_known_value_and_bad_input():
    assert _t_quantile_closed_form(0.95, 2) == pytest.approx(4.302652729749464, rel=1e-12)
    with pytest.raises(ValueError, match="df"):
        t_quantile(0.95, 0)
    with pytest.raises(ValueError, match="confidence"):
        t_quantile(1.0, 3)
