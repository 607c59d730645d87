"""The main job: train, evaluate and look at DCNv2 detectors on the shapes benchmark, in one command.

    python -P -m mmdet_dcnv2.tools.demo                                   # make demo: DCNv2, seed 0
    python -P -m mmdet_dcnv2.tools.demo --models regular dcnv2 --seeds 0 1 2 --jobs 2 \\
        --work-dir work_dirs/shapes_compare                               # make demo-compare
    python -P -m mmdet_dcnv2.tools.demo --models regular dcnv2 dcnv1:0 dcnv2_mdpool:0 \\
        dcnv2_mdpool_mimic:0 --seeds 0 1 2 --jobs 2 --work-dir work_dirs/shapes_compare   # make ablation

(``-P`` keeps the current directory off ``sys.path``, so that inside the source tree the installed
package, which has the compiled extension, is imported.)

Steps: check (or generate, once) the benchmark data (``mmdet_dcnv2.datasets.shapes``) and the pretrained
backbone (its sha256); for each seed, build and initialise the regular model once and save its state,
which every arm loads (paired arms: every shared parameter starts identical, same data order); for each
arm and seed, train with mmengine's Runner (``configs/shapes/*.py``), logging losses, ETA and the health
of the deformable layers; evaluate on the test split (reported) and the geometry-off control
(``test_rigid``) with mmdet's CocoMetric, plus class-correct recall at score >= 0.5; draw detections; and
finally compare every arm with the regular one, seed by seed, with intervals
(``mmdet_dcnv2.benchmark.report``).

Writes, under ``WORK_DIR/<model>/seed<S>/``: ``metrics.json``, ``run.json`` (what the run is),
``train.log``, ``scalars.json``, ``deform_health.json``, ``detections_<split>.bbox.json``,
``loss_curve.png``, ``vis/*.png`` and the final checkpoint; ``WORK_DIR/initial_state/seed<S>.pth``; and
``WORK_DIR/summary.{json,md}`` + ``loss_curves.png``. A finished run whose directory already holds the
very same run is reused; a directory holding another run's results is refused (nothing overwritten).

``--jobs 2`` trains two runs at a time in child processes (``--threads`` each; their logs go to
``WORK_DIR/console/<model>_seed<S>.log`` and the parent prints their progress). Distributed (2 CPU processes, gloo):
``PYTHONSAFEPATH=1 torchrun --nproc_per_node 2 -m mmdet_dcnv2.tools.demo ...`` (one run at a time; the
process group is initialised here before the Runner, as mmengine 0.10.7 cannot do it on a CPU-only
machine).
"""

import argparse
import json
import os
import os.path as osp
import re
import subprocess
import sys
import time
from typing import Dict, List, Optional, Tuple

from mmdet_dcnv2.benchmark.arms import ARMS, REFERENCE_ARM

EVAL_SPLITS = ("val", "test", "test_rigid")


def _dist_info() -> Tuple[int, int]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _init_distributed() -> bool:
    """Under torchrun (WORLD_SIZE > 1): a gloo process group, set up before any Runner exists."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    import torch
    import torch.distributed as dist

    torch.set_num_threads(max(1, (os.cpu_count() or 2) // int(os.environ["WORLD_SIZE"])))
    dist.init_process_group("gloo")
    return True


def _barrier(distributed: bool) -> None:
    if distributed:
        import torch.distributed as dist

        dist.barrier()


def parse_models(specs: List[str], seeds: List[int]) -> List[Tuple[str, int]]:
    """``["regular", "dcnv1:0", "dcnv2:1,2"]`` -> [(arm, seed), ...] (a bare name takes ``seeds``)."""
    runs: List[Tuple[str, int]] = []
    for spec in specs:
        name, _, seed_text = spec.partition(":")
        if name not in ARMS:
            raise ValueError(f"--models: unknown model {name!r}; expected one of {', '.join(ARMS)} (NAME or NAME:S,S)")
        try:
            own = [int(s) for s in seed_text.split(",")] if seed_text else seeds
        except ValueError:
            raise ValueError(f"--models: {spec!r}: seeds after ':' must be integers, e.g. {name}:0,1") from None
        runs += [(name, seed) for seed in own if (name, seed) not in runs]
    return runs


def prepare_data(args) -> None:
    """Generate the data if missing; refuse a directory with other or damaged data."""
    from mmdet_dcnv2.datasets import shapes

    counts = {split: getattr(args, "num_" + split) for split in shapes.SPLITS}
    state = shapes.check(args.data_root, counts, seed=args.data_seed)
    if state == "missing":
        start = time.perf_counter()
        shapes.generate(args.data_root, counts, seed=args.data_seed, verbose=True)
        print(f"shapes dataset: generated in {time.perf_counter() - start:.1f} s", flush=True)
    else:
        print(f"shapes dataset: using {args.data_root} (checksums verified)", flush=True)


def prepare_initial_states(seeds: List[int], options) -> None:
    """The regular model's initialised state for each seed (mmdet_dcnv2.benchmark.pairing), made once."""
    from mmdet_dcnv2.benchmark import pairing
    from mmdet_dcnv2.benchmark.run import build_config, initial_state_path
    from mmdet_dcnv2.benchmark.workdir import WorkDirError, model_hash

    for seed in seeds:
        path = initial_state_path(options, seed)
        cfg = build_config(REFERENCE_ARM, seed, options, for_pairing=True)
        made_from = {"model_sha256": model_hash(cfg), "pretrained_sha256": options.pretrained["sha256"]}
        record = osp.splitext(path)[0] + ".json"
        if osp.exists(path):
            try:
                with open(record) as f:
                    if json.load(f) == made_from:
                        continue
            except (OSError, ValueError):
                pass
            raise WorkDirError(
                f"{path} is the initial state of another set-up (other model config or pretrained weights): "
                "pass another --work-dir, or remove that directory to start afresh"
            )
        pairing.save_initial_state(cfg, path)
        with open(record, "w") as f:
            json.dump(made_from, f, indent=1)


_PROGRESS = re.compile(r"Iter\(train\)\s*\[\s*(\d+)/(\d+)\].*?eta:\s*(\S+)")


def _progress(console: str) -> str:
    try:
        with open(console, errors="replace") as f:
            lines = f.readlines()[-60:]
    except OSError:
        return "starting"
    for line in reversed(lines):
        match = _PROGRESS.search(line)
        if match:
            return f"iter {match.group(1)}/{match.group(2)}, ETA {match.group(3)}"
    return "evaluating" if any("Epoch(test)" in line or "Evaluating" in line for line in lines) else "starting"


def run_in_children(runs: List[Tuple[str, int]], argv: List[str], options, jobs: int) -> None:
    """Each run in a child process (``--single-run``), ``jobs`` at a time, progress every 60 s."""
    pending, active, failed = list(runs), {}, []
    env = dict(os.environ, OMP_NUM_THREADS=str(options.threads), PYTHONSAFEPATH="1")
    last_report = time.monotonic()
    while pending or active:
        while pending and len(active) < jobs:
            arm, seed = pending.pop(0)
            # Not inside the run's directory: that one is the child's to claim (benchmark.workdir).
            console = osp.join(osp.abspath(options.work_dir), "console", f"{arm}_seed{seed}.log")
            os.makedirs(osp.dirname(console), exist_ok=True)
            cmd = [sys.executable, "-P", "-m", "mmdet_dcnv2.tools.demo", *argv, "--single-run", f"{arm}:{seed}"]
            log = open(console, "w")
            active[(arm, seed)] = (subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env), log, console)
            print(f"started {arm} seed {seed} (log: {console})", flush=True)
        time.sleep(2)
        for key, (process, log, console) in list(active.items()):
            if process.poll() is not None:
                log.close()
                del active[key]
                status = "done" if process.returncode == 0 else f"FAILED (exit {process.returncode}; see {console})"
                print(f"{key[0]} seed {key[1]}: {status}", flush=True)
                if process.returncode != 0:
                    failed.append(key)
        if active and time.monotonic() - last_report >= 60:
            last_report = time.monotonic()
            states = "; ".join(f"{a} seed {s}: {_progress(c)}" for (a, s), (_, _, c) in active.items())
            print(f"[{time.strftime('%H:%M:%S')}] {states}; {len(pending)} waiting", flush=True)
    if failed:
        raise SystemExit(f"demo: {len(failed)} run(s) failed: {failed}")


def build_parser() -> argparse.ArgumentParser:
    from mmengine.config import DictAction

    from mmdet_dcnv2.datasets import shapes

    parser = argparse.ArgumentParser(
        prog="python -P -m mmdet_dcnv2.tools.demo",
        description="Train, evaluate and compare DCNv2 detectors on the shapes benchmark (docs/main_job.md). "
        "make demo = defaults (work dir work_dirs/shapes_demo); make demo-compare = --models regular dcnv2 "
        "--seeds 0 1 2 --jobs 2 --work-dir work_dirs/shapes_compare.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--work-dir", default="work_dirs/shapes_demo", help="runs go to WORK_DIR/<model>/seed<S>")
    parser.add_argument(
        "--data-root", default="data/shapes", help="the benchmark data: generated here if missing, checked if present"
    )
    parser.add_argument(
        "--models",
        nargs="+",
        default=None,
        metavar="NAME[:S,S]",
        help=f"which arms to run: {', '.join(ARMS)}; NAME:0,1 gives that arm its own seeds (default: dcnv2)",
    )
    parser.add_argument(
        "--baseline", action="store_true", help="also run the regular ConvNet (as --models regular dcnv2)"
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="training seeds (paired across models)")
    parser.add_argument("--jobs", type=int, default=1, help="runs trained at the same time, in child processes")
    parser.add_argument("--iters", type=int, default=None, help="override the configs' training iterations")
    parser.add_argument("--batch-size", type=int, default=None, help="override the configs' batch size")
    parser.add_argument(
        "--eval-splits",
        nargs="+",
        choices=EVAL_SPLITS,
        default=["test", "test_rigid"],
        help="splits to evaluate on after training (val is for choosing a recipe; test is what is reported)",
    )
    for split in shapes.SPLITS:
        flag = "--num-" + split.replace("_", "-")
        parser.add_argument(flag, type=int, default=shapes.DEFAULT_COUNTS[split], help=f"{split} images to generate")
    parser.add_argument("--data-seed", type=int, default=0, help="seed of the generated dataset")
    parser.add_argument(
        "--pretrained", default=None, help="backbone weights (default: the cached ones, made on first use)"
    )
    parser.add_argument("--num-vis", type=int, default=8, help="test images to draw")
    parser.add_argument("--score-thr", type=float, default=0.5, help="score threshold of the drawings")
    parser.add_argument("--health-interval", type=int, default=100, help="iterations between health measurements")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads per run (default 1: on a 2-core machine two 1-thread runs at a time beat "
        "one 2-thread run; 0 keeps torch's default)",
    )
    parser.add_argument("--cfg-options", nargs="+", action=DictAction, help="mmengine config overrides (every run)")
    parser.add_argument("--single-run", default=None, help=argparse.SUPPRESS)  # NAME:SEED, from run_in_children
    return parser


def main(argv: Optional[List[str]] = None) -> Dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.models is None:
        args.models = [REFERENCE_ARM, "dcnv2"] if args.baseline else ["dcnv2"]
    elif args.baseline and not any(m.partition(":")[0] == REFERENCE_ARM for m in args.models):
        args.models = [REFERENCE_ARM, *args.models]
    for name in ("jobs", "iters", "batch_size", "num_vis", "health_interval"):
        value = getattr(args, name)
        if value is not None and value < (0 if name == "num_vis" else 1):
            parser.error(f"--{name.replace('_', '-')} must be a positive integer, got {value}")
    try:
        runs = parse_models(args.models, args.seeds)
    except ValueError as error:
        parser.error(str(error))

    from mmdet_dcnv2.benchmark.pretrained import PretrainedError
    from mmdet_dcnv2.benchmark.workdir import WorkDirError
    from mmdet_dcnv2.datasets.shapes import DatasetError

    try:
        return _main(args, argv, runs)
    except (DatasetError, PretrainedError, WorkDirError) as error:
        print(f"demo: {error}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None


def _main(args, argv: List[str], runs: List[Tuple[str, int]]) -> Dict:
    distributed = _init_distributed()
    rank, _ = _dist_info()
    if args.threads and not distributed:
        import torch

        torch.set_num_threads(args.threads)

    import mmdet_dcnv2  # noqa: F401  (registers our layers; the configs' custom_imports would too)
    from mmdet_dcnv2.benchmark import pretrained, report
    from mmdet_dcnv2.benchmark.run import RunOptions, run
    from mmdet_dcnv2.datasets import shapes

    if args.pretrained is None and not os.path.exists(pretrained.default_path()):
        if args.single_run is not None or rank != 0:
            _barrier(distributed)  # rank 0 makes it
        else:
            from mmdet_dcnv2.tools.pretrain_backbone import pretrain

            print(
                f"pretrained backbone: none in {pretrained.cache_dir()} yet; pretraining it once (~12 min on 2 "
                "cores, cached for every later run)",
                flush=True,
            )
            pretrain(pretrained.default_path(), threads=os.cpu_count() or 1)  # alone on the machine: every core
            if args.threads:
                import torch

                torch.set_num_threads(args.threads)
            _barrier(distributed)
    elif args.pretrained is None:
        _barrier(distributed)
    record = pretrained.verify(args.pretrained)
    if args.single_run is None and rank == 0:
        prepare_data(args)
    _barrier(distributed)  # rank 0 checks/generates first
    checksums = shapes.read_meta(args.data_root)["checksums"]
    options = RunOptions(
        work_dir=args.work_dir,
        data_root=args.data_root,
        pretrained=record,
        data_checksums=checksums,
        eval_splits=args.eval_splits,
        iters=args.iters,
        batch_size=args.batch_size,
        threads=args.threads,
        num_vis=args.num_vis,
        score_thr=args.score_thr,
        health_interval=args.health_interval,
        cfg_options=args.cfg_options,
        distributed=distributed,
    )
    if args.single_run is not None:  # a child of run_in_children: one run, no summary
        arm, _, seed = args.single_run.partition(":")
        return run(arm, int(seed), options)

    if rank == 0:
        print(f"pretrained backbone: {record['path']} (sha256 {record['sha256'][:16]}... verified)", flush=True)
        prepare_initial_states(sorted({seed for _, seed in runs}), options)
    _barrier(distributed)

    started = time.perf_counter()
    if args.jobs > 1 and not distributed and len(runs) > 1:
        run_in_children(runs, argv, options, args.jobs)  # children take --single-run over --models
        results = [report.load_run(options.work_dir, arm, seed) for arm, seed in runs]
    else:
        results = [run(arm, seed, options) for arm, seed in runs]
    if rank != 0:
        return {}
    summary = report.write(options.work_dir, results, time.perf_counter() - started, args)
    print("\n" + summary["markdown"] + f"\nwritten under {osp.abspath(options.work_dir)}", flush=True)
    return summary


if __name__ == "__main__":
    main()
