"""Export an mmdet DCNv2 model to standard ONNX and check the file in ONNX Runtime, in one command.

    python -P -m mmdet_dcnv2.tools.export_onnx CONFIG CHECKPOINT --out model.onnx
        [--part backbone+neck|detector] [--shape H W] [--opset 20] [--runs 3]

``--part backbone+neck`` (the default) exports ``neck(backbone(x))`` of the detector: input ``x``
(N, 3, H, W), the data preprocessor's output (normalised, padded to its size divisor), outputs one
feature map per FPN level; batch, height and width are dynamic (H and W multiples of the size
divisor). DCNv2 layers become ONNX ``DeformConv`` (opset >= 19). The whole test-time detector
(``--part detector``) is refused with the pieces that block it (see :func:`detector_blockers`).

The checkpoint is loaded strictly before anything is exported: an unreadable file, or one whose
keys or shapes do not match the config's model, stops the command. After exporting, the file is
checked by ``onnx.checker``, its operators are listed (standard ONNX only), and it is run in ONNX
Runtime on the same input as PyTorch: the command prints the largest difference and both CPU
times (median of ``--runs``, the same thread count), and exits non-zero if the difference exceeds
``--rtol`` times the largest output magnitude.
"""

import argparse
import collections
import os.path as osp
import sys
from typing import Dict, List, Tuple

PARTS = ("backbone+neck", "detector")


def parse_args(argv=None):
    from mmengine.config import DictAction

    parser = argparse.ArgumentParser(
        description="Export an mmdet DCNv2 model to standard ONNX (DeformConv) and check it in ONNX Runtime."
    )
    parser.add_argument("config", help="mmdet config (with custom_imports=['mmdet_dcnv2'] for DCNv2 models)")
    parser.add_argument("checkpoint", help="checkpoint of that config's model")
    parser.add_argument("--out", required=True, help="ONNX file to write")
    parser.add_argument("--part", choices=PARTS, default="backbone+neck", help="what to export (default: %(default)s)")
    parser.add_argument(
        "--shape",
        type=int,
        nargs=2,
        metavar=("H", "W"),
        default=None,
        help="example input height and width (default: the test pipeline's scale, padded to the "
        "size divisor); the file accepts any multiple of the size divisor",
    )
    parser.add_argument("--batch", type=int, default=1, help="example batch size (the file accepts any)")
    parser.add_argument("--opset", type=int, default=None, help="ONNX opset (>= 19; default: torch's exporter default)")
    parser.add_argument("--runs", type=int, default=3, help="timed runs per runtime for the speed comparison")
    parser.add_argument(
        "--rtol",
        type=float,
        default=1e-4,
        help="largest accepted |PyTorch - ORT|, relative to the largest |PyTorch output|",
    )
    parser.add_argument("--cfg-options", nargs="+", action=DictAction, help="mmengine config overrides")
    args = parser.parse_args(argv)
    for name in ("batch", "runs"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be positive, got {getattr(args, name)}")
    return args


class BackboneNeck:
    """``neck(backbone(x))`` of a detector as a module (built lazily so torch is imported late)."""

    @staticmethod
    def wrap(detector):
        from torch import nn

        class _BackboneNeck(nn.Module):
            def __init__(self, detector):
                super().__init__()
                self.backbone = detector.backbone
                self.neck = detector.neck if getattr(detector, "with_neck", False) else None

            def forward(self, x):
                features = self.backbone(x)
                return tuple(self.neck(features) if self.neck is not None else features)

        return _BackboneNeck(detector).eval()


def build_model(config: str, cfg_options=None):
    """The config's detector (eval mode, untrained) and the config."""
    from mmdet.registry import MODELS
    from mmengine.config import Config
    from mmengine.registry import init_default_scope

    import mmdet_dcnv2  # noqa: F401  (registers our layers)

    cfg = Config.fromfile(config)
    if cfg_options:
        cfg.merge_from_dict(cfg_options)
    init_default_scope(cfg.get("default_scope", "mmdet"))
    model = MODELS.build(cfg.model)
    model.cfg = cfg
    return model.eval(), cfg


def load_checkpoint_strictly(model, checkpoint: str) -> None:
    """Every key and shape must match: a wrong or corrupt checkpoint would otherwise export a model
    with random weights (mmdet's own loaders only warn)."""
    from mmengine.runner import load_checkpoint

    try:
        load_checkpoint(model, checkpoint, map_location="cpu", strict=True, logger="silent")
    except Exception as error:  # unreadable file, pickle error, missing/unexpected keys, size mismatch
        raise SystemExit(
            f"export_onnx: checkpoint {checkpoint!r} does not fit the config's model, nothing "
            f"exported: {type(error).__name__}: {str(error).strip()[:2000]}"
        ) from error


def mmcv_modules(module) -> List[str]:
    """Submodules running mmcv's compiled ops, which torch.export cannot trace (FakeTensor data-pointer
    errors): e.g. mmcv's own DCNv2 when MMDET_DCNV2_OVERRIDE=0 keeps it."""
    return [
        f"{name} ({type(m).__module__}.{type(m).__name__})"
        for name, m in module.named_modules()
        if type(m).__module__.startswith("mmcv.ops")
    ]


def detector_blockers(model, cfg) -> List[str]:
    """What stops the whole test-time detector from being exported, as readable items."""
    blockers = [f"mmcv op {item}" for item in mmcv_modules(model)]
    for name, m in model.named_modules():
        if type(m).__name__.endswith("RoIExtractor"):
            blockers.append(
                f"{name} ({type(m).__name__}: mmdet maps RoIs to FPN levels with a data-dependent branch per level)"
            )
    nms = [path for path, value in _walk(cfg.model.get("test_cfg") or {}) if path.endswith("nms") and value]
    if nms:
        blockers.append("mmcv nms in mmdet's post-processing (test_cfg." + ", test_cfg.".join(nms) + ")")
    blockers.append("mmdet's predict() interface (data samples, per-image Python loops over detections)")
    return blockers


def _walk(cfg, prefix=""):
    for key, value in cfg.items():
        path = f"{prefix}{key}"
        yield path, value
        if isinstance(value, dict):
            yield from _walk(value, path + ".")


def default_shape(cfg, divisor: int) -> Tuple[int, int]:
    """The test pipeline's scale (long side as width), padded to the size divisor."""
    from mmdet.utils import get_test_pipeline_cfg

    scale = next((step.get("scale") for step in get_test_pipeline_cfg(cfg) if step["type"] == "Resize"), None)
    if not scale:
        raise SystemExit("export_onnx: the test pipeline has no Resize scale; give --shape H W")
    scale = (scale, scale) if isinstance(scale, int) else scale
    pad = lambda n: -(-int(n) // divisor) * divisor  # noqa: E731
    return pad(min(scale)), pad(max(scale))


def check_and_time(path: str, part, x, runs: int) -> Dict[str, float]:
    """Run the file in ONNX Runtime on ``x``; compare with PyTorch and time both."""
    import torch

    from mmdet_dcnv2.onnx import flat_outputs, max_abs_diff, median_seconds, ort_session, run_ort

    with torch.no_grad():
        expected = flat_outputs(part(x))
        session = ort_session(path)
        actual = run_ort(session, [x])
        return {
            "max_abs_diff": max_abs_diff(expected, actual),
            "max_abs_output": max(float(t.abs().max()) for t in expected),
            "torch_s": median_seconds(lambda: part(x), repeat=runs),
            "ort_s": median_seconds(lambda: run_ort(session, [x]), repeat=runs),
            "threads": torch.get_num_threads(),
        }


def operator_counts(path: str) -> Dict[str, int]:
    """Operator histogram of the file; refuses any non-standard domain or local function."""
    import onnx

    onnx.checker.check_model(path, full_check=True)
    model = onnx.load(path, load_external_data=False)
    custom = sorted({n.domain for n in model.graph.node if n.domain not in ("", "ai.onnx")})
    if custom or model.functions:
        raise SystemExit(
            f"export_onnx: {path} uses non-standard operators (domains {custom}, "
            f"{len(model.functions)} local functions)"
        )
    return dict(sorted(collections.Counter(n.op_type for n in model.graph.node).items()))


def main(argv=None) -> Dict[str, object]:
    args = parse_args(argv)
    for argument, path in (("config", args.config), ("checkpoint", args.checkpoint)):
        if not osp.isfile(path):
            raise SystemExit(f"export_onnx: {argument} {path!r} does not exist")
    import torch
    from torch.export import Dim

    from mmdet_dcnv2.onnx import DEFAULT_OPSET, export

    model, cfg = build_model(args.config, args.cfg_options)
    if args.part == "detector":
        raise SystemExit(
            "export_onnx: --part detector is not supported: torch.export cannot trace "
            + "; ".join(detector_blockers(model, cfg))
            + ". Export --part backbone+neck and run the heads in PyTorch on its feature maps."
        )
    load_checkpoint_strictly(model, args.checkpoint)
    part = BackboneNeck.wrap(model)
    blocked = mmcv_modules(part)
    if blocked:
        raise SystemExit(
            "export_onnx: cannot export mmcv's compiled ops (torch.export fails on them): "
            + ", ".join(blocked)
            + ". Build the model with mmdet_dcnv2's layers "
            "(custom_imports=['mmdet_dcnv2'], MMDET_DCNV2_OVERRIDE unset)."
        )

    divisor = int(getattr(model.data_preprocessor, "pad_size_divisor", 1) or 1)
    height, width = args.shape or default_shape(cfg, divisor)
    if height % divisor or width % divisor:
        raise SystemExit(
            f"export_onnx: --shape {height} {width} must be multiples of the size divisor {divisor} "
            "(the data preprocessor pads images to it)"
        )
    x = torch.randn(args.batch, 3, height, width, generator=torch.Generator().manual_seed(0))
    # H and W as multiples of the divisor keep every stride-2 stage and FPN upsampling exact.
    dims = {
        0: Dim("batch", min=1, max=1024),
        2: divisor * Dim("h_blocks", min=1, max=4096 // divisor),
        3: divisor * Dim("w_blocks", min=1, max=4096 // divisor),
    }
    opset = args.opset or DEFAULT_OPSET
    print(
        f"export_onnx: exporting {args.part} of {osp.basename(args.config)} at {tuple(x.shape)}, opset {opset}",
        flush=True,
    )
    export(part, (x,), args.out, dynamic_shapes={"x": dims}, opset_version=opset, input_names=["x"])
    ops = operator_counts(args.out)
    print(f"export_onnx: wrote {args.out}: operators {ops}")
    result = {
        "config": args.config,
        "part": args.part,
        "shape": list(x.shape),
        "operators": ops,
        **check_and_time(args.out, part, x, args.runs),
    }
    print(
        f"export_onnx: ONNX Runtime vs PyTorch on the same input: max abs diff {result['max_abs_diff']:.3g} "
        f"(largest |output| {result['max_abs_output']:.3g})"
    )
    print(
        f"export_onnx: CPU time per forward ({result['threads']} threads, median of {args.runs}): "
        f"PyTorch {result['torch_s'] * 1e3:.1f} ms, ONNX Runtime {result['ort_s'] * 1e3:.1f} ms "
        f"({result['torch_s'] / result['ort_s']:.2f}x)"
    )
    if not result["max_abs_diff"] <= args.rtol * max(result["max_abs_output"], 1.0):
        raise SystemExit(
            f"export_onnx: ONNX Runtime differs from PyTorch by {result['max_abs_diff']:.3g}, more than "
            f"--rtol {args.rtol} x {max(result['max_abs_output'], 1.0):.3g}"
        )
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
