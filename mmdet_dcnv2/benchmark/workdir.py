"""Run directories that never lose results: a run's directory names what it holds.

Each run writes ``run.json`` (its signature: arm, seed, the resolved config's hash, the data's and the
pretrained weights' checksums, threads, ...) before it trains and ``metrics.json`` when it is done. A
later command with the same signature reuses the finished results (so ``make ablation`` reuses
``make demo-compare``'s runs); a directory holding another run's results is refused, not overwritten.
"""

import hashlib
import json
import os
import os.path as osp
from typing import Dict, Optional


class WorkDirError(RuntimeError):
    """A run directory that holds another run's results (the message says which and what to do)."""


def config_hash(cfg) -> str:
    """sha256 of the resolved config, without the per-run names (work dir, experiment/visualizer name)."""
    data = cfg.to_dict()
    for key in ("work_dir", "experiment_name", "load_from"):
        data.pop(key, None)
    data.get("visualizer", {}).pop("name", None)
    text = json.dumps(data, sort_keys=True, default=repr)
    return hashlib.sha256(text.encode()).hexdigest()


def model_hash(cfg) -> str:
    """sha256 of the resolved model config alone (what an initial state depends on, with the seed)."""
    text = json.dumps(cfg.model.to_dict(), sort_keys=True, default=repr)
    return hashlib.sha256(text.encode()).hexdigest()


def _read(path: str) -> Optional[Dict]:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def claim(run_dir: str, signature: Dict) -> Optional[Dict]:
    """Prepare ``run_dir`` for the run ``signature`` describes.

    Returns the finished run's metrics if ``run_dir`` already holds this very run, complete (nothing to
    do); None if the run should (re)start there (empty, or this run's own unfinished attempt). Raises
    WorkDirError if it holds anything else."""
    signature_file, metrics_file = osp.join(run_dir, "run.json"), osp.join(run_dir, "metrics.json")
    if osp.isdir(run_dir) and os.listdir(run_dir):
        existing = _read(signature_file)
        if existing != signature:
            what = "results of another run" if existing else "files that are not a run of this command"
            differs = sorted(k for k in signature if (existing or {}).get(k) != signature[k]) if existing else []
            raise WorkDirError(
                f"{run_dir} holds {what}" + (f" ({', '.join(differs)} differ)" if differs else "") + ". "
                "Nothing was overwritten: pass another --work-dir, or remove that directory to run again."
            )
        metrics = _read(metrics_file)
        if metrics is not None:
            return metrics
    os.makedirs(run_dir, exist_ok=True)
    tmp = signature_file + ".tmp"
    with open(tmp, "w") as f:
        json.dump(signature, f, indent=1, sort_keys=True)
    os.replace(tmp, signature_file)
    return None
