"""The benchmark's tables: every run, every arm over its seeds, and each deformable arm against the
regular ConvNet on the seeds they share (paired: mmdet_dcnv2.evaluation.paired_comparison)."""

import json
import os
import os.path as osp
import platform
import statistics
from typing import Dict, List, Optional

from .arms import ARMS, REFERENCE_ARM

# (metric name in paired_comparison, split, label). AP_S/M/L are in the per-run table: each bootstrapped
# AP costs ~1-2 min here (300 images x up to 100 detections, 1000 resamples, every seed of both arms).
COMPARISONS = (
    ("AP", "test", "test AP"),
    ("recall", "test", "test recall@0.5"),
    ("AP", "test_rigid", "geometry-off AP"),
)
NUM_RESAMPLES = 1000


def load_run(work_dir: str, arm: str, seed: int) -> Dict:
    path = osp.join(work_dir, arm, f"seed{seed}", "metrics.json")
    with open(path) as f:
        return json.load(f)


def _pct(value: Optional[float]) -> str:
    return "–" if value is None or value < 0 else f"{100 * value:.1f}"


def _worst_outside(run: Dict) -> Optional[float]:
    health = run.get("deform_health") or {}
    layers = health.get("layers") or {}
    fractions = [layer["outside_fraction"] for layer in layers.values() if layer.get("outside_fraction") is not None]
    return max(fractions) if fractions else None


def machine() -> str:
    """CPU model (vendor string, family/model), CPU count and torch version: every table says where."""
    import torch

    fields = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                fields.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    cpu = fields.get("model name") or platform.processor() or platform.machine()
    if "cpu family" in fields and "model" in fields:
        cpu += f" (family {fields['cpu family']} model {fields['model']})"
    return f"{cpu}, {os.cpu_count()} CPUs, torch {torch.__version__}"


def primary_split(results: List[Dict]) -> str:
    """The split the tables report: test when every run has it, else the first one evaluated (val, in
    recipe work)."""
    if all("test" in r["evaluation"] for r in results):
        return "test"
    return next(iter(results[0]["evaluation"]))


def runs_table(results: List[Dict], split: str) -> List[str]:
    lines = [
        f"| model | seed | {split} AP | AP50 | AP_S | AP_M | AP_L | recall@0.5 | geometry-off AP | "
        "max outside | train min |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        main = r["evaluation"][split]
        box = main["bbox"]
        rigid = r["evaluation"].get("test_rigid")
        worst = _worst_outside(r)
        lines.append(
            f"| {r['label']} | {r['seed']} | {_pct(box.get('bbox_mAP'))} | {_pct(box.get('bbox_mAP_50'))} | "
            f"{_pct(box.get('bbox_mAP_s'))} | {_pct(box.get('bbox_mAP_m'))} | {_pct(box.get('bbox_mAP_l'))} | "
            f"{_pct(main['recall_at_score_0.5']['recall'])} | "
            f"{_pct(rigid['bbox']['bbox_mAP']) if rigid else '–'} | "
            f"{'–' if worst is None else f'{worst:.2f}'} | {r['train_time_s'] / 60:.1f} |"
        )
    return lines


def _mean_sd(values: List[float]) -> str:
    values = [100 * v for v in values]
    if not values:
        return "–"
    if len(values) == 1:
        return f"{values[0]:.1f}"
    return f"{statistics.mean(values):.1f} ± {statistics.stdev(values):.1f}"


def arms_table(results: List[Dict], split: str) -> List[str]:
    lines = [
        f"| model | seeds | {split} AP (mean ± SD) | recall@0.5 | geometry-off AP |",
        "|---|---|---|---|---|",
    ]
    for arm in ARMS:
        runs = [r for r in results if r["model"] == arm]
        if not runs:
            continue
        main = [r["evaluation"][split] for r in runs]
        rigid = [r["evaluation"]["test_rigid"]["bbox"]["bbox_mAP"] for r in runs if "test_rigid" in r["evaluation"]]
        seeds = ",".join(str(r["seed"]) for r in runs)
        lines.append(
            f"| {ARMS[arm].label} | {seeds} | {_mean_sd([m['bbox']['bbox_mAP'] for m in main])} | "
            f"{_mean_sd([m['recall_at_score_0.5']['recall'] for m in main])} | {_mean_sd(rigid)} |"
        )
    return lines


def compare(results: List[Dict], arm: str, split_main: str = "test") -> Optional[Dict]:
    """``arm`` against the regular ConvNet on the seeds both have (None if fewer than one shared seed)."""
    from mmdet_dcnv2.evaluation import ImageLevelEval, paired_comparison

    ours = {r["seed"]: r for r in results if r["model"] == arm}
    regular = {r["seed"]: r for r in results if r["model"] == REFERENCE_ARM}
    seeds = sorted(set(ours) & set(regular))
    if not seeds:
        return None
    out = {"seeds": seeds, "metrics": []}
    for metric, split, label in COMPARISONS:
        if split == "test" and split_main != "test":
            split, label = split_main, label.replace("test", split_main)
        if any(split not in r["evaluation"] for r in (*[ours[s] for s in seeds], *[regular[s] for s in seeds])):
            continue
        ann = ours[seeds[0]]["evaluation"][split]
        gt = osp.join(ours[seeds[0]]["data_root"], "annotations", f"instances_{split}.json")

        def evals(runs: Dict) -> Dict:
            return {
                s: ImageLevelEval(gt, osp.join(runs[s]["work_dir"], runs[s]["evaluation"][split]["detections_file"]))
                for s in seeds
            }

        try:
            result = paired_comparison(evals(regular), evals(ours), metric=metric, num_resamples=NUM_RESAMPLES)
        except ValueError as error:  # e.g. AP_l undefined: no large instance in the split
            out["metrics"].append({"label": label, "error": str(error)})
            continue
        result["label"] = label
        result["instances"] = ann["instances_by_area"]
        out["metrics"].append(result)
    return out


def comparison_table(arm: str, comparison: Dict) -> List[str]:
    seeds = comparison["seeds"]
    lines = [
        f"**{ARMS[arm].label} − regular ConvNet**, paired seeds {', '.join(map(str, seeds))} "
        f"(per-seed differences; intervals at 95%: t over seeds with {len(seeds) - 1} df, paired image "
        f"bootstrap ({NUM_RESAMPLES} resamples), and both combined):",
        "",
        "| metric | regular (per seed) | this model (per seed) | D = mean diff | t-interval | bootstrap | "
        "combined | wins |",
        "|---|---|---|---|---|---|---|---|",
    ]

    def interval(pair) -> str:
        return "–" if pair is None else f"[{100 * pair[0]:+.1f}, {100 * pair[1]:+.1f}]"

    for m in comparison["metrics"]:
        if "error" in m:
            lines.append(f"| {m['label']} | – | – | undefined: {m['error']} | | | | |")
            continue
        per_a = " / ".join(f"{100 * v:.1f}" for v in m["a"])
        per_b = " / ".join(f"{100 * v:.1f}" for v in m["b"])
        lines.append(
            f"| {m['label']} | {per_a} | {per_b} | {100 * m['mean_diff']:+.1f} | {interval(m['t_interval'])} | "
            f"{interval(m['bootstrap_interval'])} | {interval(m['combined_interval'])} | "
            f"{m['wins']}/{m['num_seeds']} |"
        )
    return lines


def health_table(run: Dict) -> List[str]:
    """Every deformable conv layer of one run at the end of training (DeformHealthHook's last record)."""
    layers = (run.get("deform_health") or {}).get("layers") or {}
    lines = [
        f"Deformable layers of {run['label']}, seed {run['seed']}, after {run['iterations']} iterations "
        "(first 8 val images): sampling outside the map (mask-weighted) against a regular conv's padding share, "
        "median offset length in pixels of the layer's input, mean modulation:",
        "",
        "| layer | map | outside | padding (zero offsets) | median offset px | mean mask |",
        "|---|---|---|---|---|---|",
    ]
    for name, layer in layers.items():
        mask = "–" if layer.get("mean_mask") is None else f"{layer['mean_mask']:.3f}"
        h, w = layer["map_hw"]
        lines.append(
            f"| {name} | {h}x{w} | {layer['outside_fraction']:.3f} | {layer['padding_fraction']:.3f} | "
            f"{layer['median_offset_px']:.3g} | {mask} |"
        )
    return lines


def write(work_dir: str, results: List[Dict], total_time: float, args) -> Dict:
    """``summary.json`` / ``summary.md`` (+ ``loss_curves.png``) under ``work_dir``; returns the summary."""
    from .pictures import plot_losses

    split = primary_split(results)
    main = results[0]["evaluation"][split]
    trained = sum(r["train_time_s"] for r in results) / 60
    lines = [
        f"Machine: {machine()}; {results[0]['threads']} thread(s) per run. This command: {total_time / 60:.1f} min "
        f"(finished runs found in the work dir are reused); the {len(results)} runs' own training: {trained:.1f} "
        "min in all."
    ]
    if main is not None:
        by_area = main["instances_by_area"]
        lines.append(
            f"{split.capitalize()} split: {main['images']} images, {by_area.get('all')} instances "
            f"(small {by_area.get('small')}, "
            f"medium {by_area.get('medium')}, large {by_area.get('large')}: COCO's area ranges on the visible "
            "mask area). AP in %, COCO box mAP@[.5:.95]; recall@0.5 = class-correct recall of detections "
            "with score >= 0.5 at IoU >= 0.5; max outside = the largest fraction of sampling outside the map "
            "over the deformable layers at the end of training."
        )
    lines += ["", *runs_table(results, split), "", *arms_table(results, split)]
    comparisons = {}
    for arm in ARMS:
        if arm == REFERENCE_ARM:
            continue
        comparison = compare(results, arm, split)
        if comparison is not None:
            comparisons[arm] = comparison
            lines += ["", *comparison_table(arm, comparison)]
    for arm in ARMS:
        first = next((r for r in results if r["model"] == arm and (r.get("deform_health") or {}).get("layers")), None)
        if first is not None:
            lines += ["", *health_table(first)]
    markdown = "\n".join(lines) + "\n"
    summary = {
        "runs": [{k: v for k, v in r.items() if k != "loss_curve"} for r in results],
        "comparisons": comparisons,
        "machine": machine(),
        "total_time_s": round(total_time, 1),
        "markdown": markdown,
    }
    os.makedirs(work_dir, exist_ok=True)
    with open(osp.join(work_dir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1, default=float)
    with open(osp.join(work_dir, "summary.md"), "w") as f:
        f.write(markdown)
    plot_losses(
        {f"{r['model']} seed {r['seed']}": r["loss_curve"] for r in results},
        osp.join(work_dir, "loss_curves.png"),
        "training loss",
        components=False,
    )
    return summary
