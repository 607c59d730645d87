"""Is a deformable convolution still sampling its input map? Measured per layer, and a training hook.

A deformable layer whose learned offsets push its sampling points off the map reads zeros there and
gets no coordinate gradient back: once every point is outside, the layer is switched off and cannot
recover (seen on c5 layers working on a 4x4 map). ``measure_deform_health`` measures, for every
MDConv/DConv of a model on one forward pass, how far the points move and how much of the sampling
(weighted by the modulation) the op reads as zero; ``DeformHealthHook`` does so on a fixed batch
during training, logs it, warns, and keeps a JSON record in the work directory.
"""

import json
import math
import os
import tempfile
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
from mmdet.registry import HOOKS
from mmengine.dataset import pseudo_collate
from mmengine.dist import is_main_process
from mmengine.hooks import Hook
from torch import Tensor, nn

from mmdet_dcnv2.models.layers.deform_conv import _DeformConvPack

from .model_wrappers import unwrap_model

HEALTH_FILE = "deform_health.json"


def deform_layers(model: nn.Module) -> Dict[str, _DeformConvPack]:
    """Every MDConv/DConv submodule of ``model`` (wrappers not unwrapped), keyed by module name."""
    return {name: m for name, m in model.named_modules() if isinstance(m, _DeformConvPack)}


def default_forward(model: nn.Module, inputs: Any) -> Any:
    """``model.extract_feat(inputs)`` (an mmdet detector: backbone and neck, where our layers live),
    else ``model(inputs)`` (a plain nn.Module)."""
    extract_feat = getattr(model, "extract_feat", None)
    return extract_feat(inputs) if callable(extract_feat) else model(inputs)


def _tap_bases(out_size: int, kernel: int, stride: int, pad: int, dil: int) -> Tensor:
    """(kernel, out_size) integer positions o * stride - pad + k * dil: where tap k of output o samples
    with a zero offset (conv_base_y/conv_base_x in csrc/dcn_common.h)."""
    out = torch.arange(out_size, dtype=torch.int64) * stride - pad
    return out.unsqueeze(0) + (torch.arange(kernel, dtype=torch.int64) * dil).unsqueeze(1)


class _Accumulator:
    """One layer's sums over every call in the forward pass (a layer may run more than once)."""

    def __init__(self) -> None:
        self.lengths: List[Tensor] = []
        self.outside_weighted = 0.0
        self.weight = 0.0
        self.outside = 0
        self.padding_outside = 0.0
        self.points = 0
        self.mask_sum = 0.0
        self.modulated = False
        self.map_hw: Optional[Tuple[int, int]] = None
        self.calls = 0

    def result(self) -> Dict[str, Any]:
        lengths = torch.cat(self.lengths)
        # The lower median (torch's); NaN offsets (read as zero, so counted outside) are left out of it.
        median = torch.nanmedian(lengths).item() if lengths.numel() else float("nan")
        if self.weight > 0:
            outside = self.outside_weighted / self.weight
        else:  # every mask is zero: the layer reads nothing anywhere; say where it would have read
            outside = self.outside / self.points if self.points else float("nan")
        return {
            "median_offset_px": float(median),
            "outside_fraction": float(outside),
            "mean_mask": self.mask_sum / self.points if self.modulated and self.points else None,
            "padding_fraction": self.padding_outside / self.points if self.points else float("nan"),
            "map_hw": self.map_hw,
            "calls": self.calls,
        }


def _accumulate(acc: _Accumulator, layer: _DeformConvPack, x: Tensor) -> None:
    offset, mask = layer.offset_and_mask(x)
    n, _, out_h, out_w = offset.shape
    height, width = x.shape[-2:]
    kh, kw = layer.kernel_size
    groups, taps = layer.deform_groups, kh * kw
    # The kernels add offset and base position in at::opmath_type of the offset's dtype (float for
    # float32/half/bfloat16, double for double); doing the same keeps points at a boundary on the same
    # side of it as the op (3 + 0.99999994 is 4.0 in float32).
    dtype = torch.float64 if offset.dtype == torch.float64 else torch.float32
    off = offset.to(dtype).view(n, groups, taps, 2, out_h, out_w)
    dy, dx = off[:, :, :, 0], off[:, :, :, 1]  # (N, G, taps, Ho, Wo)
    rows = _tap_bases(out_h, kh, layer.stride[0], layer.padding[0], layer.dilation[0])
    cols = _tap_bases(out_w, kw, layer.stride[1], layer.padding[1], layer.dilation[1])
    # The zero-offset grid is a product of rows and columns: the share of its points in the map (what a
    # regular convolution does not spend on its zero padding) is the product of the two shares.
    rows_in = ((rows > -1) & (rows < height)).double().mean().item()
    cols_in = ((cols > -1) & (cols < width)).double().mean().item()
    # tap k = i * kw + j samples row base_y[i, ho] and column base_x[j, wo]
    base_y = rows.repeat_interleave(kw, dim=0).view(1, 1, taps, out_h, 1).to(off.device, dtype)
    base_x = cols.repeat(kh, 1).view(1, 1, taps, 1, out_w).to(off.device, dtype)
    y, x_pos = base_y + dy, base_x + dx
    # zero_border_in_range in csrc/dcn_common.h: the op interpolates only -1 < y < H and -1 < x < W;
    # anything else (the boundary itself, NaN, infinities) reads zero. Written so that NaN fails.
    inside = (y > -1) & (x_pos > -1) & (y < height) & (x_pos < width)
    outside = (~inside).to(torch.float64)
    acc.lengths.append(torch.sqrt(dy.double() ** 2 + dx.double() ** 2).flatten().cpu())
    acc.outside += int(outside.sum().item())
    acc.padding_outside += (1.0 - rows_in * cols_in) * outside.numel()
    acc.points += outside.numel()
    if mask is not None:
        weights = mask.to(torch.float64).view(n, groups, taps, out_h, out_w)
        acc.modulated = True
        acc.mask_sum += weights.sum().item()
    else:
        weights = torch.ones_like(outside)
    acc.outside_weighted += (outside * weights).sum().item()
    acc.weight += weights.sum().item()
    if acc.map_hw is None:
        acc.map_hw = (int(height), int(width))
    acc.calls += 1


def measure_deform_health(
    model: nn.Module,
    inputs: Any,
    forward: Optional[Callable[[nn.Module, Any], Any]] = None,
) -> Dict[str, Dict[str, Any]]:
    """How each MDConv/DConv of ``model`` samples its input on one forward pass of ``inputs``.

    ``forward(model, inputs)`` runs the pass; by default :func:`default_forward`, i.e.
    ``model.extract_feat(inputs)`` for an mmdet detector (``inputs`` a preprocessed image batch) and
    ``model(inputs)`` for a module without ``extract_feat``. The pass runs under ``torch.no_grad``
    with every module in eval mode; each module's own mode is restored afterwards. A forward
    pre-hook on each layer (removed in any case) takes the layer's input ``x`` and calls
    ``layer.offset_and_mask(x)`` again, so nothing but a few sums per layer is kept.

    Returns, keyed by module name (e.g. ``backbone.layer4.0.conv2``), for each layer the pass ran:

    - ``median_offset_px``: median over all sampling points (images, deform groups, taps, output
      pixels) of the length of the offset (dy, dx), in pixels of the layer's input map (the lower
      median, as torch.median; NaN offsets are left out).
    - ``outside_fraction``: the fraction of sampling points at which the op reads zero, i.e. outside
      ``-1 < y < H, -1 < x < W`` of the input map (the boundary itself is outside: the bilinear
      sampler's strict inequalities in csrc/dcn_common.h; NaN and infinities are outside too), where
      tap (i, j) of output pixel (ho, wo) samples ``y = ho * stride_h - pad_h + i * dil_h + dy``,
      ``x = wo * stride_w - pad_w + j * dil_w + dx``. Each point is weighted by its modulation
      scalar (mask; 1 for DConv), so it measures the share of the layer's weighted sampling that is
      lost. If every mask is zero the unweighted fraction is reported instead.
    - ``mean_mask``: the mean modulation scalar over all sampling points; None for DConv.
    - ``padding_fraction``: the unweighted outside fraction with zero offsets, i.e. the taps a regular
      convolution spends on its zero padding: where ``outside_fraction`` starts at initialisation
      (offsets zero, masks uniform), and what it is to be compared with. On small maps it is large
      (3x3, pad 1: 20/36 on 2x2, 44/144 on 4x4).
    - ``map_hw``: (H, W) of the input map (of the first call, if the layer ran more than once).
    - ``calls``: how many times the layer ran in the pass (the statistics pool all calls).

    Layers the pass does not reach (e.g. in a head, with ``extract_feat``) are not in the result.
    """
    forward = default_forward if forward is None else forward
    layers = deform_layers(model)
    accumulators = {name: _Accumulator() for name in layers}
    modes = {m: m.training for m in model.modules()}
    handles = []
    try:
        for name, layer in layers.items():

            def pre_hook(module, args, acc=accumulators[name]):
                _accumulate(acc, module, args[0])

            handles.append(layer.register_forward_pre_hook(pre_hook))
        model.eval()
        with torch.no_grad():
            forward(model, inputs)
    finally:
        for handle in handles:
            handle.remove()
        for module, training in modes.items():
            module.training = training
    return {name: acc.result() for name, acc in accumulators.items() if acc.calls}


def summarize(layers: Dict[str, Dict[str, Any]]) -> Dict[str, Any]:
    """One measurement in a few numbers: the worst layer (largest outside_fraction) and its fraction,
    the median over layers of their median offsets, the mean over MDConv layers of their mean masks."""
    if not layers:
        return {"worst_layer": None, "worst_outside_fraction": float("nan"), "median_offset_px": float("nan")}
    worst = max(layers, key=lambda name: _nan_low(layers[name]["outside_fraction"]))
    medians = torch.tensor([v["median_offset_px"] for v in layers.values()], dtype=torch.float64)
    masks = [v["mean_mask"] for v in layers.values() if v["mean_mask"] is not None]
    return {
        "worst_layer": worst,
        "worst_outside_fraction": layers[worst]["outside_fraction"],
        "median_offset_px": torch.nanmedian(medians).item(),
        "mean_mask": sum(masks) / len(masks) if masks else None,
    }


def _nan_low(value: float) -> float:
    return -1.0 if math.isnan(value) else value


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check(name: str, value, ok: bool, expected: str) -> None:
    if not ok:
        raise ValueError(f"DeformHealthHook: {name} must be {expected}, got {value!r}")


@HOOKS.register_module()
class DeformHealthHook(Hook):
    """Measures the deformable layers' sampling (:func:`measure_deform_health`) during training.

    At ``before_train`` it takes a fixed batch, the first ``num_images`` samples of the val
    dataloader's dataset (else the test dataloader's, else the train dataloader's; the log says
    which), collated with ``pseudo_collate`` and passed through ``model.data_preprocessor(batch,
    False)`` once. It measures the model on that batch at ``before_train``, after every
    ``interval``-th training iteration and at ``after_train`` (unless that iteration was just
    measured); each measurement logs one line (worst layer's outside fraction, median over layers of
    the median offset, mean mask), warns naming every layer whose ``outside_fraction`` exceeds
    ``outside_warning``, and is appended as ``{"iter": ..., "layers": {...}}`` to
    ``work_dir/deform_health.json`` (a JSON list, rewritten atomically each time; a resumed run keeps
    the records before the iteration it resumes from). ``hook.last`` is the latest record,
    ``hook.history`` all of them.

    Only the main process (rank 0) measures and writes: the measurement is an extra forward pass
    with no collective communication, so the other ranks need not wait for it. A model without
    MDConv/DConv layers (the regular-ConvNet baseline) is logged once and left alone.
    """

    def __init__(self, interval: int = 50, num_images: int = 8, outside_warning: float = 0.5) -> None:
        _check("interval", interval, _is_int(interval) and interval >= 1, "an integer >= 1")
        _check("num_images", num_images, _is_int(num_images) and num_images >= 1, "an integer >= 1")
        _check(
            "outside_warning",
            outside_warning,
            isinstance(outside_warning, (int, float))
            and not isinstance(outside_warning, bool)
            and 0.0 <= outside_warning <= 1.0,
            "a number in [0, 1]",
        )
        self.interval = interval
        self.num_images = num_images
        self.outside_warning = float(outside_warning)
        self.last: Optional[Dict[str, Any]] = None
        self.history: List[Dict[str, Any]] = []
        self.source: Optional[str] = None
        self._batch: Optional[Dict[str, Any]] = None
        self._active = False

    # ---- runner callbacks ----
    def before_train(self, runner) -> None:
        self._active = False
        if not is_main_process():
            return
        model = unwrap_model(runner.model)
        if not deform_layers(model):
            runner.logger.info("DeformHealthHook: the model has no MDConv/DConv layers; nothing to measure")
            return
        self._batch, self.source, count = self._fixed_batch(runner, model)
        runner.logger.info(
            f"DeformHealthHook: measuring on the first {count} samples of the "
            f"{self.source} dataset, every {self.interval} iterations"
        )
        self.history = self._earlier_records(runner) if runner.iter > 0 else []
        self._active = True
        self._measure(runner, runner.iter, first=True)

    def after_train_iter(self, runner, batch_idx: int, data_batch=None, outputs=None) -> None:
        if self._active and self.every_n_train_iters(runner, self.interval):
            self._measure(runner, runner.iter + 1)

    def after_train(self, runner) -> None:
        if self._active and (self.last is None or self.last["iter"] != runner.iter):
            self._measure(runner, runner.iter)

    # ---- helpers ----
    def _fixed_batch(self, runner, model: nn.Module) -> Tuple[Dict[str, Any], str, int]:
        for source in ("val", "test", "train"):
            loop = getattr(runner, f"{source}_loop", None)  # builds a configured val/test loop, as a run would
            dataset = getattr(getattr(loop, "dataloader", None), "dataset", None)
            if dataset is None or len(dataset) == 0:
                continue
            samples = [dataset[i] for i in range(min(self.num_images, len(dataset)))]
            return model.data_preprocessor(pseudo_collate(samples), False), source, len(samples)
        raise RuntimeError("DeformHealthHook: no val, test or train dataloader with a non-empty dataset")

    def _earlier_records(self, runner) -> List[Dict[str, Any]]:
        path = os.path.join(runner.work_dir, HEALTH_FILE)
        try:
            with open(path) as f:
                records = json.load(f)
        except (OSError, ValueError):
            return []
        return [r for r in records if isinstance(r, dict) and r.get("iter", runner.iter) < runner.iter]

    def _measure(self, runner, iteration: int, first: bool = False) -> None:
        model = unwrap_model(runner.model)
        layers = measure_deform_health(model, self._batch["inputs"])
        if first:
            missing = sorted(set(deform_layers(model)) - set(layers))
            if missing:
                runner.logger.info(
                    f"DeformHealthHook: {len(missing)} deformable layers are not reached by extract_feat "
                    f"and not measured: {', '.join(missing)}"
                )
        record = {"iter": int(iteration), "layers": layers}
        self.last = record
        self.history.append(record)
        s = summarize(layers)
        mask = "n/a (DConv)" if s["mean_mask"] is None else f"{s['mean_mask']:.3f}"
        runner.logger.info(
            f"deform health @ iter {iteration}: {len(layers)} layers; worst outside fraction "
            f"{s['worst_outside_fraction']:.3f} ({s['worst_layer']}); median offset {s['median_offset_px']:.3g} px "
            f"(median over layers); mean mask {mask}"
        )
        for name, value in layers.items():
            if value["outside_fraction"] > self.outside_warning:
                h, w = value["map_hw"]
                runner.logger.warning(
                    f"deform health @ iter {iteration}: {name} samples {value['outside_fraction']:.1%} "
                    f"(mask-weighted) outside its {h}x{w} input map (> outside_warning={self.outside_warning}; "
                    f"{value['padding_fraction']:.1%} with zero offsets): those points read zero and pass no "
                    "gradient to the offsets"
                )
        self._write(runner.work_dir)

    def _write(self, work_dir: str) -> None:
        os.makedirs(work_dir, exist_ok=True)
        # A reader (or a crash) never sees a half-written file: write a temp file next to it, then rename.
        fd, tmp = tempfile.mkstemp(prefix=".deform_health.", suffix=".tmp", dir=work_dir)
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(self.history, f, indent=1)
            os.replace(tmp, os.path.join(work_dir, HEALTH_FILE))
        except BaseException:
            if os.path.exists(tmp):
                os.remove(tmp)
            raise
