"""The network nodes whose spatial support is analysed, and their responses as functions of the image.

Three kinds (paper Sec. 2.1):

- ``conv``: a unit of the last c5 layer (the output of the backbone's last residual stage) at an
  image position. Its response is one channel of the feature vector there, or, with no channel
  given, the sum over channels -- the c5 output is post-ReLU, so that is the L1 norm of the node's
  feature vector, a smoother and channel-independent summary of what the node encodes.
- ``cls``: the per-RoI classification node of a box -- the box head's score of one class (the
  detected one by default), softmax over the logits as mmdet's ``BBoxHead`` computes it (or the
  loss's own activation, e.g. sigmoid). The score rather than the logit: logits are defined only up
  to a common additive constant, so a relative error of a logit (the saliency view) would depend on
  that arbitrary shift; the score is also the number the detector reports.
- ``reg``: the per-RoI box-regression node -- the box head's 4 deltas (dx, dy, dw, dh) of that class.

The RoI of an RoI node is **the box itself**, held fixed: the node is then a function of the image
alone (the proposals would move as the image is masked), and the box is what the pictures show.
mmdet's ``predict`` does not say which proposal produced a detection, so a detection's nodes are
evaluated on its final box.

Node specs (``--nodes``): ``KIND:WHERE[#INDEX]`` with WHERE ``detN`` (the N-th best detection: its
box, or its centre for ``conv``) or coordinates in the original image (``X,Y`` for ``conv``,
``X1,Y1,X2,Y2`` for ``cls``/``reg``); INDEX is the c5 channel (``conv``) or the class (``cls``/``reg``).
"""

import math
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

from .model import LoadedImage, class_names, normalise

NODE_KINDS = ("conv", "cls", "reg")


@dataclass(frozen=True)
class ConvNode:
    """A unit of the last c5 layer at feature position (row, col): the one nearest the requested
    image position; it is centred on image pixel (stride * col, stride * row)."""

    row: int
    col: int
    stride: int
    channel: Optional[int]
    kind: str = "conv"

    @property
    def x(self) -> int:
        return self.stride * self.col

    @property
    def y(self) -> int:
        return self.stride * self.row

    @property
    def name(self) -> str:
        channel = "" if self.channel is None else f"_ch{self.channel}"
        return f"conv_x{self.x}_y{self.y}{channel}"

    @property
    def label(self) -> str:
        what = "sum over channels" if self.channel is None else f"channel {self.channel}"
        return f"c5 unit (row {self.row}, col {self.col}) centred at ({self.x}, {self.y}), {what}"

    def response(self, model: nn.Module, batch: Tensor) -> Tensor:
        """(B, 1): the node's response for each image of a normalised batch."""
        c5 = last_c5_output(model, batch)[:, :, self.row, self.col]
        return (c5.sum(1) if self.channel is None else c5[:, self.channel]).unsqueeze(1)

    def sampling_layers(self, model: nn.Module) -> List[Tuple[str, nn.Module]]:
        """The spatial (k > 1) convolutions of the last residual stage, bottom first: the three
        conv2 of res5 in a ResNet-50, deformable or not."""
        stage_name, stage = last_residual_stage(model)
        offset_convs = {id(m.conv_offset) for m in stage.modules() if hasattr(m, "conv_offset")}
        return [(f"backbone.{stage_name}.{name}", module) for name, module in stage.named_modules()
                if _is_spatial_conv(module) and id(module) not in offset_convs]


@dataclass(frozen=True)
class RoINode:
    """The classification (``cls``) or box-regression (``reg``) node of the box head for one box."""

    kind: str
    box: Tuple[float, float, float, float]  # x1, y1, x2, y2 in network-input coordinates
    class_index: int
    class_name: str
    source: str  # "det0", or "box" for a box given by coordinates

    @property
    def name(self) -> str:
        return f"{self.kind}_{self.source}"

    @property
    def label(self) -> str:
        what = "classification score" if self.kind == "cls" else "box-regression deltas"
        box = ", ".join(f"{v:.0f}" for v in self.box)
        return f"{what} of '{self.class_name}', RoI ({box})"

    def response(self, model: nn.Module, batch: Tensor) -> Tensor:
        """(B, 1) class score or (B, 4) deltas for each image of a normalised batch, the RoI fixed."""
        cls_score, bbox_pred = roi_head_outputs(model, batch, self.box)
        if self.kind == "cls":
            return class_scores(model, cls_score)[:, self.class_index:self.class_index + 1]
        if bbox_pred.shape[1] == 4:  # reg_class_agnostic
            return bbox_pred
        return bbox_pred[:, 4 * self.class_index:4 * self.class_index + 4]

    def sampling_layers(self, model: nn.Module) -> List[Tuple[str, nn.Module]]:
        """The box head's RoI layers (one per FPN level, or the shared one); only the level the box
        maps to is called."""
        extractor = model.roi_head.bbox_roi_extractor
        layers = [(f"roi_head.bbox_roi_extractor.roi_layers.{i}", layer)
                  for i, layer in enumerate(getattr(extractor, "roi_layers", []))]
        if getattr(extractor, "shared_roi_layer", None) is not None:
            layers.append(("roi_head.bbox_roi_extractor.shared_roi_layer", extractor.shared_roi_layer))
        return layers


Node = Union[ConvNode, RoINode]


def last_residual_stage(model: nn.Module) -> Tuple[str, nn.Module]:
    backbone = model.backbone
    names = getattr(backbone, "res_layers", None)
    if not names:
        raise ValueError(f"conv nodes need a ResNet-style backbone (with res_layers); "
                         f"{type(backbone).__name__} has none")
    return names[-1], getattr(backbone, names[-1])


def last_c5_output(model: nn.Module, batch: Tensor) -> Tensor:
    """(B, C, h, w): the output of the backbone's last residual stage (captured with a hook, so the
    backbone's ``out_indices`` do not matter)."""
    _, stage = last_residual_stage(model)
    captured = []
    handle = stage.register_forward_hook(lambda module, args, output: captured.append(output))
    try:
        model.backbone(batch)
    finally:
        handle.remove()
    return captured[-1]


def roi_head_outputs(model: nn.Module, batch: Tensor, box: Sequence[float]) -> Tuple[Tensor, Tensor]:
    """The box head's (cls_score, bbox_pred) for the same RoI in every image of the batch."""
    roi_head = getattr(model, "roi_head", None)
    if roi_head is None or not getattr(roi_head, "with_bbox", False):
        raise ValueError(f"cls/reg nodes need a two-stage detector with a box head; "
                         f"{type(model).__name__} has none")
    feats = model.extract_feat(batch)
    rois = torch.cat([torch.arange(batch.shape[0], dtype=batch.dtype, device=batch.device)[:, None],
                      batch.new_tensor(box).expand(batch.shape[0], 4)], dim=1)
    # StandardRoIHead's own box path (extractor, shared head, box head), as in its predict/loss.
    result = roi_head._bbox_forward(feats, rois)
    return result["cls_score"], result["bbox_pred"]


def class_scores(model: nn.Module, cls_score: Tensor) -> Tensor:
    """Class scores from the box head's logits, as ``BBoxHead.predict_by_feat`` computes them."""
    bbox_head = model.roi_head.bbox_head
    if getattr(bbox_head, "custom_cls_channels", False):
        return bbox_head.loss_cls.get_activation(cls_score)
    return nn.functional.softmax(cls_score, dim=-1)


def _is_spatial_conv(module: nn.Module) -> bool:
    # Deformable layers are recognised by their offset conv (ours and mmcv's), plain ones by type.
    kernel = getattr(module, "kernel_size", (1, 1))
    spatial = max(kernel if isinstance(kernel, tuple) else (kernel,)) > 1
    deformable = hasattr(module, "conv_offset")
    return spatial and (deformable or type(module) is nn.Conv2d)


# -------------------------------------------------------------------------------------- parsing

def parse_spec(spec: str) -> Tuple[str, str, Optional[int]]:
    """``KIND:WHERE[#INDEX]`` -> (kind, where, index); errors name the spec and the grammar."""
    kind, sep, rest = spec.partition(":")
    if not sep or kind not in NODE_KINDS:
        raise ValueError(f"--nodes {spec!r}: unknown node kind {kind!r}; expected KIND:WHERE[#INDEX] with KIND one "
                         f"of {', '.join(NODE_KINDS)} (e.g. conv:det0, cls:det0, conv:64,40, reg:10,10,50,60#2)")
    where, _, index = rest.partition("#")
    if index and not index.isdigit():
        raise ValueError(f"--nodes {spec!r}: the index after '#' must be a non-negative integer, got {index!r}")
    return kind, where, int(index) if index else None


def resolve_nodes(specs: Sequence[str], model: nn.Module, image: LoadedImage, detections) -> List[Node]:
    """Turn node specs into nodes, checked against the image, the c5 map and the detections."""
    return [_resolve(spec, model, image, detections) for spec in specs]


def _resolve(spec: str, model: nn.Module, image: LoadedImage, detections) -> Node:
    kind, where, index = parse_spec(spec)
    boxes, scores, labels = detections
    if where.startswith("det"):
        if not where[3:].isdigit():
            raise ValueError(f"--nodes {spec!r}: expected det<N> (e.g. det0), got {where!r}")
        rank = int(where[3:])
        if rank >= len(boxes):
            raise ValueError(f"--nodes {spec!r}: the detector found {len(boxes)} detection(s) with score >= the "
                             f"--score-thr on {image.path}; det{rank} does not exist")
        box = tuple(float(v) for v in boxes[rank])
        if kind == "conv":
            return conv_node(model, image, ((box[0] + box[2]) / 2, (box[1] + box[3]) / 2), index, spec)
        class_index = int(labels[rank]) if index is None else index
        return roi_node(model, image, kind, box, class_index, where, spec)
    values = _numbers(spec, where, 2 if kind == "conv" else 4)
    sx, sy = image.scale_factor
    if kind == "conv":
        return conv_node(model, image, (values[0] * sx, values[1] * sy), index, spec)
    box = (values[0] * sx, values[1] * sy, values[2] * sx, values[3] * sy)
    return roi_node(model, image, kind, box, index, "box_" + "_".join(f"{v:g}" for v in values), spec)


def conv_node(model: nn.Module, image: LoadedImage, xy: Tuple[float, float], channel: Optional[int],
              spec: str) -> ConvNode:
    height, width = image.size
    x, y = xy
    if not (0 <= x <= width - 1 and 0 <= y <= height - 1):
        raise ValueError(f"--nodes {spec!r}: position ({x:g}, {y:g}) is outside the network-input image "
                         f"({width}x{height}; x in [0, {width - 1}], y in [0, {height - 1}])")
    with torch.no_grad():
        batch = normalise(model, image.pixels[None].to(next(model.parameters())))
        c5 = last_c5_output(model, batch)
    stride = batch.shape[-2] // c5.shape[-2]
    # Feature position u of a stride-S ResNet map is centred on image pixel S*u (see sampling_locations).
    row, col = min(round(y / stride), c5.shape[-2] - 1), min(round(x / stride), c5.shape[-1] - 1)
    if channel is not None and channel >= c5.shape[1]:
        raise ValueError(f"--nodes {spec!r}: channel {channel} out of range; the c5 layer has {c5.shape[1]}")
    return ConvNode(row, col, stride, channel)


def roi_node(model: nn.Module, image: LoadedImage, kind: str, box, class_index: Optional[int], source: str,
             spec: str) -> RoINode:
    x1, y1, x2, y2 = box
    height, width = image.size
    if not (x2 > x1 and y2 > y1 and all(map(math.isfinite, box))):
        raise ValueError(f"--nodes {spec!r}: expected a box X1,Y1,X2,Y2 with X2 > X1 and Y2 > Y1, got {box}")
    if x2 <= 0 or y2 <= 0 or x1 >= width or y1 >= height:
        raise ValueError(f"--nodes {spec!r}: box {box} does not overlap the network-input image ({width}x{height})")
    names = class_names(model)
    num_classes = int(model.roi_head.bbox_head.num_classes)
    if class_index is None:  # the box head's best foreground class on the full image
        with torch.no_grad():
            batch = normalise(model, image.pixels[None].to(next(model.parameters())))
            cls_score, _ = roi_head_outputs(model, batch, box)
        class_index = int(cls_score[0, :num_classes].argmax())
    if not 0 <= class_index < num_classes:
        raise ValueError(f"--nodes {spec!r}: class {class_index} out of range; the box head has {num_classes}")
    name = names[class_index] if class_index < len(names) else str(class_index)
    return RoINode(kind, tuple(float(v) for v in box), class_index, name, source)


def _numbers(spec: str, where: str, count: int) -> List[float]:
    try:
        values = [float(v) for v in where.split(",")]
    except ValueError:
        values = []
    if len(values) != count:
        expected = "X,Y" if count == 2 else "X1,Y1,X2,Y2"
        raise ValueError(f"--nodes {spec!r}: expected det<N> or {expected} (original-image pixels), got {where!r}")
    return values
