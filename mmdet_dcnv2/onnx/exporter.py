"""torch.onnx.export (the dynamo exporter) with our ops translated to standard ONNX operators."""

import os
from typing import Any, Callable, Dict, Optional, Sequence

import torch

from .. import ops as _ops  # noqa: F401  (registers torch.ops.mmdet_dcnv2.*)
from . import translations

# DeformConv appeared in opset 19; torch 2.14's exporter defaults to 20.
MIN_OPSET = 19
DEFAULT_OPSET = 20
# The model IR version written. The newest onnx's default (12 for onnx 1.23) is refused by
# onnxruntime 1.31; torch's exporter writes 10, which ORT has read since 1.16. Set explicitly so a
# newer exporter default cannot silently produce files the runtime rejects.
IR_VERSION = 10


def custom_translation_table() -> Dict[Callable, Callable]:
    """``custom_translation_table`` for ``torch.onnx.export(..., dynamo=True)``: our two ops as
    ONNX ``DeformConv`` and ``RoiAlign`` (opset >= 19)."""
    return {
        torch.ops.mmdet_dcnv2.modulated_deform_conv2d.default: translations.modulated_deform_conv2d,
        torch.ops.mmdet_dcnv2.deform_roi_pool.default: translations.deform_roi_pool,
    }


def export(
    model: torch.nn.Module,
    args: Sequence[Any],
    path: Optional[str] = None,
    *,
    dynamic_shapes: Optional[Any] = None,
    opset_version: int = DEFAULT_OPSET,
    ir_version: int = IR_VERSION,
    input_names: Optional[Sequence[str]] = None,
    output_names: Optional[Sequence[str]] = None,
):
    """Export ``model(*args)`` to ONNX with standard operators only; returns the ``onnx.ModelProto``
    (and writes it to ``path`` when given, weights inside the file unless it would pass 2 GB).

    ``dynamic_shapes`` as for ``torch.export.export`` (e.g. ``{"x": {0: Dim("batch"), 2: Dim("h")}}``).
    The model should be in eval mode (a training-mode BatchNorm exports its batch statistics).
    """
    if isinstance(opset_version, bool) or not isinstance(opset_version, int) or opset_version < MIN_OPSET:
        raise ValueError(
            f"opset_version must be an int >= {MIN_OPSET} (ONNX DeformConv appeared in opset "
            f"{MIN_OPSET}), got {opset_version!r}"
        )
    if isinstance(ir_version, bool) or not isinstance(ir_version, int) or ir_version < 8:
        raise ValueError(f"ir_version must be an int >= 8 (opset {MIN_OPSET} needs IR 9), got {ir_version!r}")
    if not isinstance(args, (tuple, list)):
        raise TypeError(f"args must be a tuple of the model's positional inputs, got {type(args).__name__}")
    program = torch.onnx.export(
        model,
        tuple(args),
        dynamo=True,
        opset_version=opset_version,
        custom_translation_table=custom_translation_table(),
        dynamic_shapes=dynamic_shapes,
        input_names=input_names,
        output_names=output_names,
        verbose=False,
    )
    program.model.ir_version = ir_version
    if path is not None:
        directory = os.path.dirname(os.path.abspath(path))
        os.makedirs(directory, exist_ok=True)
        program.save(path)
    return program.model_proto
