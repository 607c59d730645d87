"""Export DCNv2 models to standard ONNX (``DeformConv``, ``RoiAlign``) and check them in ONNX Runtime.

Needs the ``export`` extra (``pip install "mmdet_dcnv2[export]"``: onnx, onnxscript, onnx-ir,
onnxruntime) and torch alone otherwise -- no mmcv or mmdet. See docs/onnx_export.md.

    from mmdet_dcnv2.onnx import export
    export(model.eval(), (x,), "model.onnx", dynamic_shapes={"x": {0: Dim("batch"), 2: Dim("h"), 3: Dim("w")}})

or, with ``torch.onnx.export`` directly,
``torch.onnx.export(model, (x,), dynamo=True, custom_translation_table=custom_translation_table())``.
"""

from .exporter import DEFAULT_OPSET, IR_VERSION, MIN_OPSET, custom_translation_table, export
from .runtime import flat_outputs, max_abs_diff, median_seconds, ort_session, run_ort, run_reference

__all__ = [
    "DEFAULT_OPSET",
    "IR_VERSION",
    "MIN_OPSET",
    "custom_translation_table",
    "export",
    "flat_outputs",
    "max_abs_diff",
    "median_seconds",
    "ort_session",
    "run_ort",
    "run_reference",
]
