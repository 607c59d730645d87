"""Paired comparison of two detectors over training seeds, with COCO box AP recomputed per image multiset.

Why this file exists: "DCNv2 beats the regular ConvNet by 0.8 AP" on a few hundred test images and three
seeds means little without saying how much of it is seed noise and how much is the luck of the test
images. This module

* runs pycocotools' per-image matching (`COCOeval.evaluate()`) ONCE per run and keeps the per-image,
  per-category, per-area-range matches (`ImageLevelEval`);
* recomputes COCO's AP / AP50 / AP75 / AP_s / AP_m / AP_l for any multiset of test images *exactly* as
  `COCOeval.accumulate()` + `summarize()` would on a dataset where those images were literally repeated
  (`coco_metrics`), and a class-correct recall at a score threshold (`class_correct_recall`);
* compares arm A (baseline) and arm B (DCNv2) trained with the same seeds (`paired_comparison`): a
  t-interval over seeds, a paired image bootstrap (one image multiset per resample, applied to every run),
  and a combined interval; `format_comparison` prints a markdown table.

numpy and pycocotools only (scipy is used for the t quantile when it is installed): no torch, no mmdet.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import math
import os
from typing import Any, Callable, Dict, Hashable, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

# Keys of coco_metrics() and the metrics paired_comparison() accepts.
METRICS = ("AP", "AP50", "AP75", "AP_s", "AP_m", "AP_l")
COMPARISON_METRICS = METRICS + ("recall",)

# mmdet's CocoMetric sets params.maxDets = proposal_nums = (100, 300, 1000); its bbox_mAP is stats[0], which
# pycocotools' summarize() reads at 100 detections per image (the default argument of _summarize), while
# bbox_mAP_50 ... bbox_mAP_l (stats[1..5]) are read at maxDets[2] = 1000.
MMDET_MAX_DETS = (100, 300, 1000)
_AP_MAX_DET = 100

# metric -> (IoU threshold or None for the mean over all thresholds, area range label)
_METRIC_SPEC = {
    "AP": (None, "all"),
    "AP50": (0.5, "all"),
    "AP75": (0.75, "all"),
    "AP_s": (None, "small"),
    "AP_m": (None, "medium"),
    "AP_l": (None, "large"),
}

GtLike = Union[COCO, str, os.PathLike, dict]
DtLike = Union[COCO, str, os.PathLike, Sequence[dict]]


def _quiet(fn: Callable[..., Any], *args: Any) -> Any:
    # pycocotools prints progress lines for every load and evaluation; a bootstrap over many runs would
    # bury the caller's log under them.
    with contextlib.redirect_stdout(io.StringIO()):
        return fn(*args)


def _load_gt(gt: GtLike) -> COCO:
    if isinstance(gt, COCO):
        return gt
    if isinstance(gt, dict):
        coco = COCO()
        # COCOeval writes 'ignore' / '_ignore' into the annotation dicts: work on a copy of the caller's.
        coco.dataset = copy.deepcopy(gt)
        _quiet(coco.createIndex)
        return coco
    if isinstance(gt, (str, os.PathLike)):
        return _quiet(COCO, os.fspath(gt))
    raise TypeError(f"gt must be a pycocotools COCO, a COCO json path or a dict, got {type(gt).__name__}")


def _load_dt(gt: COCO, dt: DtLike) -> COCO:
    if isinstance(dt, COCO):
        return dt
    if isinstance(dt, (str, os.PathLike)):
        with open(os.fspath(dt)) as f:
            dets = json.load(f)
    elif isinstance(dt, (list, tuple)):
        dets = list(dt)
    else:
        raise TypeError(
            f"dt must be a COCO results json path, a list of detection dicts or a COCO, got {type(dt).__name__}"
        )
    for i, d in enumerate(dets):
        if not isinstance(d, dict) or not {"image_id", "category_id", "bbox", "score"} <= d.keys():
            raise ValueError(f"dt[{i}] is not a COCO box result (needs image_id, category_id, bbox, score): {d!r}")
    if not dets:
        # loadRes() fails with IndexError on an empty list (mmdet logs "results empty" and skips the metric);
        # an empty run is a legitimate run with AP 0, so build the empty results set directly.
        res = COCO()
        res.dataset = {"images": list(gt.dataset["images"]), "categories": copy.deepcopy(gt.dataset["categories"])}
        res.dataset["annotations"] = []
        _quiet(res.createIndex)
        return res
    # loadRes() adds 'area', 'id', 'iscrowd', 'segmentation' to each dict: shallow copies keep the caller's.
    return _quiet(gt.loadRes, [dict(d) for d in dets])


class _Block:
    """One (category, area range) of one run: its detections concatenated in pycocotools' image order.

    Arrays are in the order accumulate() concatenates them (image order, then each image's score-sorted,
    maxDets[-1]-truncated list), before its stable sort on -score.
    """

    __slots__ = ("scores", "image", "rank", "matched", "ignored")

    def __init__(self, scores, image, rank, matched, ignored):
        self.scores = scores  # (n,) float64
        self.image = image  # (n,) index into ImageLevelEval.img_ids
        self.rank = rank  # (n,) position in its image's score-sorted list (for the maxDet cut)
        self.matched = matched  # (T, n) bool: dtMatches != 0 (pycocotools' own test, gt id 0 included)
        self.ignored = ignored  # (T, n) bool: dtIgnore


class ImageLevelEval:
    """pycocotools' per-image box matching of one run, kept so metrics can be recomputed for any image multiset.

    Args:
        gt: ground truth: a pycocotools `COCO`, a COCO json path or a COCO dict (share one `COCO` between
            runs to load it once; see `evaluate_runs`).
        dt: detections in COCO results format (list of {image_id, category_id, bbox [x,y,w,h], score}),
            its json path (mmdet's CocoMetric writes `<outfile_prefix>.bbox.json`) or a loaded results COCO.
        max_dets: `params.maxDets`. The default is mmdet's CocoMetric's (100, 300, 1000), so `coco_metrics`
            reproduces its bbox_mAP (read at 100 detections, as `summarize()` does) and bbox_mAP_50 ... _l
            (read at maxDets[2]). Must hold 3 values, 100 among them, like `summarize()` needs.
        img_ids, cat_ids: evaluate on these only (default: all of the ground truth's, like mmdet for a
            dataset whose classes are the json's categories). pycocotools sorts them.
        iou_thrs: `params.iouThrs`; default COCO's 0.50:0.05:0.95.

    Area ranges and recall thresholds are pycocotools' defaults. `evaluate()` runs once, here.
    """

    def __init__(
        self,
        gt: GtLike,
        dt: DtLike,
        max_dets: Sequence[int] = MMDET_MAX_DETS,
        img_ids: Optional[Sequence[int]] = None,
        cat_ids: Optional[Sequence[int]] = None,
        iou_thrs: Optional[Sequence[float]] = None,
    ):
        max_dets = [int(m) for m in max_dets]
        if len(max_dets) != 3 or min(max_dets) < 1 or _AP_MAX_DET not in max_dets:
            raise ValueError(
                f"max_dets must be 3 positive counts including {_AP_MAX_DET} (COCOeval.summarize() reads AP at "
                f"{_AP_MAX_DET} detections and the other metrics at max_dets[2]), got {max_dets}"
            )
        gt_coco = _load_gt(gt)
        dt_coco = _load_dt(gt_coco, dt)
        evaluator = COCOeval(gt_coco, dt_coco, "bbox")
        p = evaluator.params
        p.maxDets = max_dets
        if img_ids is not None:
            p.imgIds = list(img_ids)
        if cat_ids is not None:
            p.catIds = list(cat_ids)
        if iou_thrs is not None:
            p.iouThrs = np.asarray(iou_thrs, dtype=np.float64).reshape(-1)
            if p.iouThrs.size == 0 or not np.all((p.iouThrs > 0) & (p.iouThrs <= 1)):
                raise ValueError(f"iou_thrs must be non-empty values in (0, 1], got {list(iou_thrs)}")
        if len(p.imgIds) == 0 or len(p.catIds) == 0:
            raise ValueError("the ground truth (or img_ids / cat_ids) has no images or no categories to evaluate")
        _quiet(evaluator.evaluate)
        p = evaluator.params  # evaluate() sorted imgIds, catIds and maxDets

        self.img_ids = np.asarray(p.imgIds)
        self.cat_ids = np.asarray(p.catIds)
        self.iou_thrs = np.array(p.iouThrs, dtype=np.float64)
        self.rec_thrs = np.array(p.recThrs, dtype=np.float64)
        self.area_labels = tuple(p.areaRngLbl)
        self.area_ranges = tuple(tuple(a) for a in p.areaRng)
        self.max_dets = tuple(p.maxDets)
        self.num_detections = len(dt_coco.getAnnIds(imgIds=list(p.imgIds), catIds=list(p.catIds)))

        K, A, n_img, T = len(self.cat_ids), len(self.area_labels), len(self.img_ids), len(self.iou_thrs)
        # num_pos[k, a, i]: non-ignored GT of category k in image i for area range a (accumulate()'s npig)
        self.num_pos = np.zeros((K, A, n_img), dtype=np.int64)
        self.blocks: List[List[_Block]] = []
        for k in range(K):
            row = []
            for a in range(A):
                scores, image, rank, matched, ignored = [], [], [], [], []
                for i in range(n_img):
                    e = evaluator.evalImgs[(k * A + a) * n_img + i]
                    if e is None:  # no GT and no detection of this category in this image
                        continue
                    self.num_pos[k, a, i] = np.count_nonzero(np.asarray(e["gtIgnore"]) == 0)
                    n = len(e["dtScores"])
                    if n == 0:
                        continue
                    scores.append(np.asarray(e["dtScores"], dtype=np.float64))
                    image.append(np.full(n, i, dtype=np.int64))
                    rank.append(np.arange(n, dtype=np.int64))
                    matched.append(np.asarray(e["dtMatches"]).reshape(T, n) != 0)
                    ignored.append(np.asarray(e["dtIgnore"], dtype=bool).reshape(T, n))
                if scores:
                    block = _Block(
                        np.concatenate(scores),
                        np.concatenate(image),
                        np.concatenate(rank),
                        np.concatenate(matched, axis=1),
                        np.concatenate(ignored, axis=1),
                    )
                else:
                    empty = np.zeros(0, dtype=np.int64)
                    block = _Block(np.zeros(0), empty, empty, np.zeros((T, 0), bool), np.zeros((T, 0), bool))
                row.append(block)
            self.blocks.append(row)

    @property
    def num_images(self) -> int:
        return len(self.img_ids)

    def area_index(self, label: str) -> int:
        return self.area_labels.index(label)

    def iou_index(self, iou_thr: float) -> Optional[int]:
        """Index of `iou_thr` in iou_thrs (summarize() compares with ==; 1e-12 tolerates a re-typed 0.75)."""
        hits = np.nonzero(np.abs(self.iou_thrs - iou_thr) <= 1e-12)[0]
        return int(hits[0]) if hits.size else None

    def same_test_set(self, other: "ImageLevelEval") -> bool:
        """Same images, categories, thresholds and non-ignored GT counts: a resample means the same for both."""
        return (
            np.array_equal(self.img_ids, other.img_ids)
            and np.array_equal(self.cat_ids, other.cat_ids)
            and np.array_equal(self.iou_thrs, other.iou_thrs)
            and np.array_equal(self.rec_thrs, other.rec_thrs)
            and self.area_ranges == other.area_ranges
            and self.max_dets == other.max_dets
            and np.array_equal(self.num_pos, other.num_pos)
        )


def evaluate_runs(gt: GtLike, detections: Mapping[Hashable, DtLike], **kwargs: Any) -> Dict[Hashable, ImageLevelEval]:
    """`ImageLevelEval` for each run ({seed: detections json path or list}), loading the ground truth once."""
    gt_coco = _load_gt(gt)
    return {seed: ImageLevelEval(gt_coco, dt, **kwargs) for seed, dt in detections.items()}


def _check_weights(image_weights: Optional[Any], num_images: int) -> np.ndarray:
    if image_weights is None:
        return np.ones(num_images, dtype=np.int64)
    w = np.asarray(image_weights)
    if w.shape != (num_images,):
        raise ValueError(f"image_weights must have one entry per evaluated image ({num_images}), got shape {w.shape}")
    if w.dtype.kind not in "iub":
        if w.dtype.kind != "f" or not np.all(np.isfinite(w)) or not np.all(w == np.round(w)):
            raise ValueError("image_weights must be integer multiplicities (a bootstrap resample's counts)")
    w = w.astype(np.int64)
    if np.any(w < 0):
        raise ValueError("image_weights must be non-negative multiplicities")
    return w


class _PrecisionKernel:
    """COCO's interpolated precision of several runs on one test set, for any image multiset.

    One (area range, IoU subset, maxDet) for all runs at once, so a bootstrap resample costs a few numpy
    passes over the detections instead of a Python loop per (run, category, threshold).

    Exactness under repeats: accumulate() concatenates the images' detection lists in image order and sorts
    with a stable mergesort on -score, so a repeated image's copies sit next to each other and equal scores
    keep (image, copy, position in the image) order. Repeating each element of the weight-1 sorted order
    w times gives (image, position, copy) instead; the two differ only inside a group of equal scores of one
    image and category, which `_fix_ties` reorders copy-major.
    """

    def __init__(self, evals: Sequence[ImageLevelEval], area: int, t_idx: Sequence[int], max_det: int):
        ref = evals[0]
        self.num_runs, self.K, self.I = len(evals), len(ref.cat_ids), ref.num_images
        self.T = len(t_idx)
        self.rec_thrs = ref.rec_thrs
        self.R = len(self.rec_thrs)
        S = self.num_runs * self.K  # segments: (run, category), run-major
        img, seg, tp, fp, gid, grank = [], [], [], [], [], []
        next_gid = 0
        for r, ev in enumerate(evals):
            for k in range(self.K):
                b = ev.blocks[k][area]
                keep = np.nonzero(b.rank < max_det)[0]  # accumulate()'s dtScores[0:maxDet] per image
                order = keep[np.argsort(-b.scores[keep], kind="mergesort")]
                m = b.matched[np.ix_(t_idx, order)]
                ig = b.ignored[np.ix_(t_idx, order)]
                img.append(b.image[order])
                seg.append(np.full(order.size, r * self.K + k, dtype=np.int64))
                tp.append(m & ~ig)
                fp.append(~m & ~ig)
                # groups of >= 2 equal scores from one image (contiguous after the stable sort)
                s, im = b.scores[order], b.image[order]
                same = np.zeros(order.size, dtype=bool)
                if order.size > 1:
                    same[1:] = (s[1:] == s[:-1]) & (im[1:] == im[:-1])
                starts = ~same
                group = np.cumsum(starts) - 1
                sizes = np.bincount(group) if order.size else np.zeros(0, np.int64)
                in_tie = sizes[group] >= 2 if order.size else np.zeros(0, bool)
                first = np.nonzero(starts)[0]
                g = np.full(order.size, -1, dtype=np.int64)
                g[in_tie] = group[in_tie] + next_gid
                next_gid += int(group[-1]) + 1 if order.size else 0
                gid.append(g)
                grank.append(np.arange(order.size) - first[group] if order.size else np.zeros(0, np.int64))
        self.img = np.concatenate(img)
        self.seg = np.concatenate(seg)
        self.tp = np.concatenate(tp, axis=1)
        self.fp = np.concatenate(fp, axis=1)
        self.tie_gid = np.concatenate(gid)
        self.tie_rank = np.concatenate(grank)
        self.in_tie = self.tie_gid >= 0
        self.has_ties = bool(self.in_tie.any())
        self.S = S
        self.num_pos = np.concatenate([ev.num_pos[:, area, :] for ev in evals], axis=0)  # (S, I)

    def _fix_ties(self, idx: np.ndarray, ew: np.ndarray) -> np.ndarray:
        pos = np.nonzero(self.in_tie[idx])[0]
        if pos.size == 0:
            return idx
        el = idx[pos]
        first = np.cumsum(ew) - ew  # where each element's first copy lands in the expanded order
        copy_no = pos - first[el]
        # groups are contiguous and numbered in order, so sorting the group members among their own
        # positions by (group, copy, position in the image) leaves every other element where it is
        idx = idx.copy()
        idx[pos] = el[np.lexsort((self.tie_rank[el], copy_no, self.tie_gid[el]))]
        return idx

    def precision(self, w: np.ndarray) -> np.ndarray:
        """(runs, T, R, K) precision as accumulate() stores it for maxDet; -1 where it skips (no positive GT)."""
        T, S, R, K = self.T, self.S, self.R, self.K
        ew = w[self.img]
        idx = np.repeat(np.arange(self.img.size), ew)
        if self.has_ties:
            idx = self._fix_ties(idx, ew)
        n = idx.size
        seg_e = self.seg[idx]
        seg_len = np.bincount(seg_e, minlength=S)
        seg_end = np.cumsum(seg_len)
        seg_start = seg_end - seg_len
        npig = self.num_pos @ w  # (S,)
        valid = npig > 0

        # cumulative TP / FP counts restarted at each segment (integers: exact, like accumulate()'s cumsum)
        tpc = np.cumsum(self.tp[:, idx], axis=1)
        fpc = np.cumsum(self.fp[:, idx], axis=1)
        zero = np.zeros((T, 1), dtype=tpc.dtype)
        tp = (tpc - np.concatenate([zero, tpc], axis=1)[:, seg_start][:, seg_e]).astype(np.float64)
        fp = (fpc - np.concatenate([zero, fpc], axis=1)[:, seg_start][:, seg_e]).astype(np.float64)
        rc = tp / np.where(valid, npig, 1)[seg_e]
        pr = tp / (fp + tp + np.spacing(1))

        # searchsorted(rc, recThrs, side='left') per (t, segment) = how many rc < thr; rc_j < thr_r iff
        # r >= searchsorted(recThrs, rc_j, side='right'), so count those per row and take a cumsum.
        s = np.searchsorted(self.rec_thrs, rc, side="right")
        row = np.arange(T)[:, None] * S + seg_e[None, :]
        counts = np.bincount((row * (R + 1) + s).ravel(), minlength=T * S * (R + 1)).reshape(T * S, R + 1)
        inds = np.cumsum(counts, axis=1)[:, :R]  # (T*S, R) local indices into each segment

        # q[r] = max(pr[inds[r]:nd]) (the monotone envelope read at inds[r]), 0 past the last detection:
        # max over each block [inds[r], inds[r+1]) by reduceat, then a suffix max over the R blocks.
        row_start = (np.arange(T)[:, None] * n + seg_start[None, :]).reshape(-1)
        bounds = np.empty((T * S, R + 1), dtype=np.int64)
        bounds[:, :R] = row_start[:, None] + inds
        bounds[:, R] = row_start + np.tile(seg_len, T)
        flat = np.concatenate([pr.reshape(-1), [0.0]])  # the pad keeps the last bound a valid index
        blk = np.maximum.reduceat(flat, bounds.reshape(-1)).reshape(T * S, R + 1)[:, :R]
        blk[bounds[:, 1:] <= bounds[:, :R]] = 0.0  # empty blocks (reduceat returns an element there)
        q = np.maximum.accumulate(blk[:, ::-1], axis=1)[:, ::-1]
        q[~np.tile(valid, T)] = -1.0
        return q.reshape(T, self.num_runs, K, R).transpose(1, 0, 3, 2)


def _summarize_mean(precision: np.ndarray) -> np.ndarray:
    """summarize()'s mean of the entries > -1, per run; precision is (runs, T, R, K). -1 where none."""
    valid = precision[0] > -1  # validity depends on the ground truth only: the same for every run
    if not valid.any():
        return np.full(precision.shape[0], -1.0)
    # one np.mean per run on summarize()'s 1-D selection: a mean over axis 1 of the stacked runs can differ
    # in the last bit (numpy may sum in another order)
    return np.array([np.mean(p[valid]) for p in precision])


class _Scorer:
    """metric(image weights) for a list of runs sharing one test set: (runs,) values."""

    def __init__(self, evals: Sequence[ImageLevelEval], metric: str, score_thr: float = 0.5, iou_thr: float = 0.5):
        _check_metric(metric, COMPARISON_METRICS)
        ref = evals[0]
        for j, ev in enumerate(evals[1:], 1):
            if not ref.same_test_set(ev):
                raise ValueError(
                    f"run {j} was not evaluated on the same test set as run 0 (images, categories, thresholds, "
                    "max_dets and ground truth must match for a paired comparison)"
                )
        self.metric = metric
        self.num_images = ref.num_images
        self.num_runs = len(evals)
        if metric == "recall":
            counts = [_recall_counts(ev, score_thr, iou_thr) for ev in evals]
            self.matched = np.stack([c[0] for c in counts])
            self.total = np.stack([c[1] for c in counts])
            self.kernel = None
            return
        iou, area_label = _METRIC_SPEC[metric]
        t_idx = list(range(len(ref.iou_thrs))) if iou is None else [ref.iou_index(iou)]
        self.kernel = None
        if None not in t_idx:
            max_det = _AP_MAX_DET if metric == "AP" else ref.max_dets[2]
            self.kernel = _PrecisionKernel(evals, ref.area_index(area_label), t_idx, max_det)

    def __call__(self, w: np.ndarray) -> np.ndarray:
        if self.metric == "recall":
            total = self.total @ w
            return np.where(total > 0, (self.matched @ w) / np.maximum(total, 1), -1.0)
        if self.kernel is None:  # the IoU threshold is not evaluated: summarize() gives -1
            return np.full(self.num_runs, -1.0)
        return _summarize_mean(self.kernel.precision(w))


def _check_metric(metric: str, choices: Sequence[str]) -> None:
    if metric not in choices:
        raise ValueError(f"metric must be one of {', '.join(choices)}; got {metric!r}")


def coco_metrics(evaluation: ImageLevelEval, image_weights: Optional[Any] = None) -> Dict[str, float]:
    """COCO box AP, AP50, AP75, AP_s, AP_m, AP_l (in [0, 1]; -1 where COCO gives -1) of one run.

    `image_weights[i]` is how many times image `evaluation.img_ids[i]` is in the test multiset (a bootstrap
    resample; None = each once). The result is what COCOeval's accumulate() + summarize() give on a dataset
    where each image is repeated that many times (copies given new ids that sort next to the original),
    not an approximation: equal to `COCOeval.stats[:6]` for weights of 1.
    """
    w = _check_weights(image_weights, evaluation.num_images)
    return {m: float(_Scorer([evaluation], m)(w)[0]) for m in METRICS}


def _recall_counts(ev: ImageLevelEval, score_thr: float, iou_thr: float) -> Tuple[np.ndarray, np.ndarray]:
    t = ev.iou_index(iou_thr)
    if t is None:
        raise ValueError(
            f"iou_thr={iou_thr} is not one of the evaluation's IoU thresholds {ev.iou_thrs.tolist()}; build the "
            "ImageLevelEval with iou_thrs including it"
        )
    a = ev.area_index("all")
    matched = np.zeros(ev.num_images, dtype=np.int64)
    for k in range(len(ev.cat_ids)):
        b = ev.blocks[k][a]
        # COCO's greedy matching takes detections in score order, so the matches of the detections scoring
        # >= score_thr are those it made before reaching any lower score: the full matching, filtered.
        # Not ignored = matched to a non-crowd GT (the 'all' range ignores only crowd GT).
        hit = (b.scores >= score_thr) & b.matched[t] & ~b.ignored[t]
        matched += np.bincount(b.image[hit], minlength=ev.num_images)
    return matched, ev.num_pos[:, a, :].sum(axis=0)


def class_correct_recall(
    evaluation: Union[ImageLevelEval, GtLike],
    dt: Optional[DtLike] = None,
    score_thr: float = 0.5,
    iou_thr: float = 0.5,
    image_weights: Optional[Any] = None,
) -> Dict[str, Any]:
    """Fraction of non-crowd GT boxes found by a detection of the same class scoring >= score_thr at IoU >= iou_thr.

    Matching is COCO's greedy one at that IoU threshold (detections by descending score, each takes the
    best-IoU unmatched GT of its class, non-crowd GT before crowd GT), on each image's top maxDets[-1]
    detections per class. Pass an `ImageLevelEval` (iou_thr must be one of its IoU thresholds), or ground
    truth and `dt` to evaluate here.

    Returns dict(recall, matched, total, matched_per_image, total_per_image); recall is -1 when there is no
    non-crowd GT. With `image_weights`, matched and total count each image that many times.
    """
    if not 0 < iou_thr <= 1:
        raise ValueError(f"iou_thr must be in (0, 1], got {iou_thr}")
    if dt is not None:
        if isinstance(evaluation, ImageLevelEval):
            raise TypeError("pass either an ImageLevelEval or ground truth with dt, not an ImageLevelEval and dt")
        thrs = np.linspace(0.5, 0.95, 10)  # COCO's, plus iou_thr when it is not one of them
        if not np.any(np.abs(thrs - iou_thr) <= 1e-12):
            thrs = np.sort(np.append(thrs, iou_thr))
        evaluation = ImageLevelEval(evaluation, dt, iou_thrs=thrs)
    elif not isinstance(evaluation, ImageLevelEval):
        raise TypeError("evaluation must be an ImageLevelEval (or ground truth, with dt given)")
    w = _check_weights(image_weights, evaluation.num_images)
    matched_i, total_i = _recall_counts(evaluation, score_thr, iou_thr)
    matched, total = int(matched_i @ w), int(total_i @ w)
    return {
        "recall": matched / total if total else -1.0,
        "matched": matched,
        "total": total,
        "matched_per_image": matched_i,
        "total_per_image": total_i,
    }


# --- Student's t quantile ------------------------------------------------------------------------------


def _t_two_sided_cdf(t: float, df: int) -> float:
    """P(|T| <= t) for Student's t with integer df (Abramowitz & Stegun 26.7.3 / 26.7.4, finite sums)."""
    theta = math.atan(t / math.sqrt(df))
    s, c2 = math.sin(theta), math.cos(theta) ** 2
    if df % 2 == 1:
        total, term = 0.0, 1.0
        for j in range(1, (df - 1) // 2 + 1):  # 1 + 2/3 c^2 + (2*4)/(3*5) c^4 + ... up to c^(df-3)
            total += term
            term *= c2 * (2 * j) / (2 * j + 1)
        return 2.0 / math.pi * (theta + s * math.cos(theta) * total) if df > 1 else 2.0 * theta / math.pi
    total, term = 0.0, 1.0
    for j in range(1, df // 2 + 1):  # 1 + 1/2 c^2 + (1*3)/(2*4) c^4 + ... up to c^(df-2)
        total += term
        term *= c2 * (2 * j - 1) / (2 * j)
    return s * total


def t_quantile(confidence: float, df: int) -> float:
    """t such that P(|T_df| <= t) = confidence (the two-sided critical value; df=2, 0.95 -> 4.303).

    scipy.stats.t.ppf when scipy is installed; otherwise the closed-form CDF for integer df, inverted by
    bisection (agrees with scipy to ~1e-12, tested).
    """
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    if int(df) != df or df < 1:
        raise ValueError(f"df must be a positive integer, got {df}")
    try:
        from scipy import stats
    except ImportError:
        return _t_quantile_closed_form(confidence, int(df))
    return float(stats.t.ppf((1 + confidence) / 2, df))


def _t_quantile_closed_form(confidence: float, df: int) -> float:
    lo, hi = 0.0, 1.0
    while _t_two_sided_cdf(hi, df) < confidence:
        lo, hi = hi, hi * 2
    for _ in range(200):
        mid = (lo + hi) / 2
        if mid in (lo, hi):
            break
        if _t_two_sided_cdf(mid, df) < confidence:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


# --- paired comparison ---------------------------------------------------------------------------------


def paired_comparison(
    runs_a: Mapping[Hashable, ImageLevelEval],
    runs_b: Mapping[Hashable, ImageLevelEval],
    metric: str = "AP",
    num_resamples: int = 2000,
    rng_seed: int = 0,
    confidence: float = 0.95,
    recall_score_thr: float = 0.5,
    recall_iou_thr: float = 0.5,
) -> Dict[str, Any]:
    """Compare arm B with arm A over paired seeds: D = mean over seeds of (B - A), and three intervals for D.

    Seed s of A and seed s of B share initial weights and data order, so the per-seed differences
    d_s = B_s - A_s are the unit of the comparison. All runs must be evaluated on the same test set.

    (a) `t_interval`: D +- t_{S-1} * SD(d) / sqrt(S). Seed-to-seed spread only: it treats the test set
        as fixed, so it says nothing about how D would move on other test images.
    (b) `bootstrap_interval`: percentile interval of D over `num_resamples` paired image bootstraps: each
        resample draws the test images with replacement once and scores every seed of both arms on that
        same multiset (exact COCO metrics of the multiset), D* = mean over seeds of (B* - A*). Test-image
        sampling only, for these trained models.
    (c) `combined_interval`: D +- t_{S-1} * sqrt(SD(d)^2 / S + SE_boot^2), SE_boot = SD of the D*
        replicates. An approximation: it adds the two variances as if seed noise and test-image noise
        were independent, and uses the t quantile with S-1 degrees of freedom for the sum (conservative
        relative to a Welch-Satterthwaite df). It is the interval to quote for "would B beat A on new
        seeds and new images from the same distribution".
    With one seed the seed spread is unknown: (a) and (c) are None and `note` says so.

    Metrics: AP, AP50, AP75, AP_s, AP_m, AP_l (COCO, as `coco_metrics`) and "recall" (class-correct recall
    at recall_score_thr / recall_iou_thr, as `class_correct_recall`). Values in [0, 1]. Resamples in which
    the metric is undefined (e.g. no small object drawn for AP_s) are dropped and counted.

    Returns a dict with keys: metric, confidence, seeds, a, b, diff (per seed, lists in seed order),
    mean_a, sd_a, mean_b, sd_b, mean_diff (D), sd_diff, wins, ties, losses (B > A, =, < per seed),
    num_seeds, num_images, t_df, t_quantile, t_interval, num_resamples, rng_seed, bootstrap_interval,
    bootstrap_se, num_undefined_resamples, combined_interval, note. SDs use ddof=1 (None with one seed).
    """
    _check_metric(metric, COMPARISON_METRICS)
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    if int(num_resamples) != num_resamples or num_resamples < 2:
        raise ValueError(f"num_resamples must be an integer >= 2, got {num_resamples}")
    if set(runs_a) != set(runs_b):
        only_a = sorted(map(repr, set(runs_a) - set(runs_b)))
        only_b = sorted(map(repr, set(runs_b) - set(runs_a)))
        raise ValueError(
            f"runs_a and runs_b must have the same seeds (paired): only in runs_a: {', '.join(only_a) or 'none'}; "
            f"only in runs_b: {', '.join(only_b) or 'none'}"
        )
    if not runs_a:
        raise ValueError("runs_a and runs_b are empty: need at least one seed")
    try:
        seeds = sorted(runs_a)
    except TypeError:  # mixed key types: keep runs_a's order
        seeds = list(runs_a)
    for name, runs in (("runs_a", runs_a), ("runs_b", runs_b)):
        for s in seeds:
            if not isinstance(runs[s], ImageLevelEval):
                raise TypeError(f"{name}[{s!r}] must be an ImageLevelEval, got {type(runs[s]).__name__}")
    S = len(seeds)
    evals = [runs_a[s] for s in seeds] + [runs_b[s] for s in seeds]
    scorer = _Scorer(evals, metric, recall_score_thr, recall_iou_thr)
    n_img = scorer.num_images

    full = scorer(np.ones(n_img, dtype=np.int64))
    if np.any(full == -1):
        raise ValueError(f"{metric} is undefined on this test set (COCO gives -1: no ground truth it counts)")
    a, b = full[:S], full[S:]
    d = b - a

    rng = np.random.default_rng(rng_seed)
    reps = np.empty(int(num_resamples))
    for j in range(reps.size):
        w = np.bincount(rng.integers(0, n_img, size=n_img), minlength=n_img)  # one multiset for every run: paired
        v = scorer(w)
        reps[j] = np.nan if np.any(v == -1) else np.mean(v[S:] - v[:S])
    ok = reps[np.isfinite(reps)]
    if ok.size < 2:
        raise ValueError(f"{metric} was undefined in all but {ok.size} of {reps.size} bootstrap resamples")
    alpha = 1 - confidence
    boot_lo, boot_hi = np.quantile(ok, [alpha / 2, 1 - alpha / 2])
    se_boot = float(np.std(ok, ddof=1))

    D = float(np.mean(d))
    out: Dict[str, Any] = {
        "metric": metric,
        "confidence": confidence,
        "seeds": seeds,
        "a": a.tolist(),
        "b": b.tolist(),
        "diff": d.tolist(),
        "mean_a": float(np.mean(a)),
        "mean_b": float(np.mean(b)),
        "mean_diff": D,
        "wins": int(np.sum(d > 0)),
        "ties": int(np.sum(d == 0)),
        "losses": int(np.sum(d < 0)),
        "num_seeds": S,
        "num_images": n_img,
        "num_resamples": int(num_resamples),
        "rng_seed": rng_seed,
        "bootstrap_interval": (float(boot_lo), float(boot_hi)),
        "bootstrap_se": se_boot,
        "num_undefined_resamples": int(reps.size - ok.size),
    }
    if S >= 2:
        sd_d = float(np.std(d, ddof=1))
        tq = t_quantile(confidence, S - 1)
        half_t = tq * sd_d / math.sqrt(S)
        half_c = tq * math.sqrt(sd_d**2 / S + se_boot**2)
        out.update(
            sd_a=float(np.std(a, ddof=1)),
            sd_b=float(np.std(b, ddof=1)),
            sd_diff=sd_d,
            t_df=S - 1,
            t_quantile=tq,
            t_interval=(D - half_t, D + half_t),
            combined_interval=(D - half_c, D + half_c),
            note=(
                f"t over {S} seeds (df {S - 1}): seed spread with the test set fixed; bootstrap: test-image "
                "sampling with the models fixed; combined (approximate): both"
            ),
        )
    else:
        out.update(
            sd_a=None,
            sd_b=None,
            sd_diff=None,
            t_df=None,
            t_quantile=None,
            t_interval=None,
            combined_interval=None,
            note="one seed: the seed-to-seed spread is unknown; only the image-bootstrap interval is reported",
        )
    return out


def format_comparison(
    result: Mapping[str, Any], name_a: str = "A (baseline)", name_b: str = "B (DCNv2)", scale: float = 100.0
) -> str:
    """Markdown for a docs page: per-seed values, mean +- SD, D with its intervals, wins/ties/losses.

    Values are multiplied by `scale` (100: AP points, as COCO tables print them).
    """

    def v(x: float) -> str:
        return f"{x * scale:.2f}"

    def dv(x: float) -> str:
        return f"{x * scale:+.2f}"

    def iv(lohi: Optional[Tuple[float, float]]) -> str:
        return "n/a" if lohi is None else f"[{dv(lohi[0])}, {dv(lohi[1])}]"

    m, S, conf = result["metric"], result["num_seeds"], result["confidence"]
    lines = [
        f"| seed | {name_a} {m} | {name_b} {m} | B − A |",
        "|---|---:|---:|---:|",
    ]
    for s, a, b, d in zip(result["seeds"], result["a"], result["b"], result["diff"]):
        lines.append(f"| {s} | {v(a)} | {v(b)} | {dv(d)} |")
    if S >= 2:
        lines.append(
            f"| mean ± SD | {v(result['mean_a'])} ± {v(result['sd_a'])} | {v(result['mean_b'])} ± "
            f"{v(result['sd_b'])} | {dv(result['mean_diff'])} ± {v(result['sd_diff'])} |"
        )
    else:
        lines.append(f"| mean | {v(result['mean_a'])} | {v(result['mean_b'])} | {dv(result['mean_diff'])} |")
    pct = f"{conf * 100:g}%"
    lines += [
        "",
        f"| D = mean(B − A) = {dv(result['mean_diff'])} | {pct} interval | accounts for |",
        "|---|---|---|",
    ]
    if result["t_interval"] is not None:
        lines.append(
            f"| t over {S} seeds (df {result['t_df']}, t = {result['t_quantile']:.2f}) | "
            f"{iv(result['t_interval'])} | seed spread (test set fixed) |"
        )
    else:
        lines.append("| t over seeds | n/a | one seed: seed spread unknown |")
    undefined = result["num_undefined_resamples"]
    dropped = f", {undefined} undefined dropped" if undefined else ""
    lines.append(
        f"| paired image bootstrap ({result['num_resamples']} resamples of {result['num_images']} images{dropped}) | "
        f"{iv(result['bootstrap_interval'])} | test-image sampling (models fixed) |"
    )
    if result["combined_interval"] is not None:
        lines.append(f"| combined (approximate) | {iv(result['combined_interval'])} | both |")
    lines += [
        "",
        f"B better than A on {result['wins']} of {S} seeds ({result['ties']} ties, {result['losses']} worse).",
    ]
    return "\n".join(lines) + "\n"
