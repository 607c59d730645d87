"""Running an exported file in ONNX Runtime (or onnx's reference evaluator) and comparing it with
PyTorch: the self-check of ``python -m mmdet_dcnv2.tools.export_onnx`` and of the tests."""

import statistics
import time
from typing import Callable, List, Optional, Sequence, Union

import numpy as np
import torch

ModelLike = Union[str, "onnx.ModelProto"]  # noqa: F821


def _serialized(model: ModelLike):
    return model if isinstance(model, str) else model.SerializeToString()


def ort_session(model: ModelLike, threads: Optional[int] = None):
    """A CPU ONNX Runtime session; ``threads`` defaults to torch's, so timings compare like with like."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads or torch.get_num_threads()
    options.inter_op_num_threads = 1
    return ort.InferenceSession(_serialized(model), options, providers=["CPUExecutionProvider"])


def _feeds(input_names: Sequence[str], inputs: Sequence[torch.Tensor]):
    if len(input_names) != len(inputs):
        raise ValueError(f"the ONNX model takes {len(input_names)} inputs ({list(input_names)}), got {len(inputs)}")
    return {name: t.detach().cpu().numpy() for name, t in zip(input_names, inputs)}


def run_ort(session, inputs: Sequence[torch.Tensor]) -> List[np.ndarray]:
    return session.run(None, _feeds([i.name for i in session.get_inputs()], inputs))


def run_reference(model: "onnx.ModelProto", inputs: Sequence[torch.Tensor]) -> List[np.ndarray]:  # noqa: F821
    """The model through ``onnx.reference.ReferenceEvaluator`` (onnx's own Python semantics)."""
    from onnx.reference import ReferenceEvaluator

    evaluator = ReferenceEvaluator(model)
    return evaluator.run(None, _feeds(evaluator.input_names, inputs))


def flat_outputs(outputs) -> List[torch.Tensor]:
    """A model's tensors, flattened in order (tuples, lists and dicts as the exporter flattens them)."""
    if isinstance(outputs, torch.Tensor):
        return [outputs]
    if isinstance(outputs, dict):
        outputs = list(outputs.values())
    return [t for item in outputs for t in flat_outputs(item)]


def max_abs_diff(expected: Sequence[torch.Tensor], actual: Sequence[np.ndarray]) -> float:
    """Largest |expected - actual| over all outputs (inf if the outputs differ in number or shape)."""
    if len(expected) != len(actual):
        return float("inf")
    worst = 0.0
    for e, a in zip(expected, actual):
        e = e.detach().cpu().numpy()
        if e.shape != a.shape:
            return float("inf")
        if e.size:
            worst = max(worst, float(np.max(np.abs(e.astype(np.float64) - a.astype(np.float64)))))
    return worst


def median_seconds(fn: Callable[[], object], repeat: int = 5, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)
