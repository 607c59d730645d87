"""The network nodes whose spatial support is analysed (paper Sec. 2.1), as functions of the image.

- ``conv``: a unit of the last c5 layer at an image position: one channel, or the sum over channels
  (post-ReLU, so the L1 norm: a smoother, channel-independent summary).
- ``cls``: an RoI's classification score of one class. The score, not the logit: logits are defined
  up to a common additive constant, which would make the saliency view's relative error arbitrary.
- ``reg``: an RoI's 4 box-regression deltas of one class.

An RoI node's box is held fixed (the detection's final box: mmdet does not say which proposal made
it), so the node depends on the image alone; proposals would move as the image is masked.
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
        return [
            (f"backbone.{stage_name}.{name}", module)
            for name, module in stage.named_modules()
            if _is_spatial_conv(module) and id(module) not in offset_convs
        ]


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
        return f"{self.kind}_{self.source}_c{self.class_index}"

    @property
    def label(self) -> str:
        what = "classification score" if self.kind == "cls" else "box-regression deltas"
        box = ", ".join(f"{v:.0f}" for v in self.box)
        return f"{what} of '{self.class_name}', RoI ({box})"

    def response(self, model: nn.Module, batch: Tensor) -> Tensor:
        """(B, 1) class score or (B, 4) deltas for each image of a normalised batch, the RoI fixed."""
        cls_score, bbox_pred = roi_head_outputs(model, batch, self.box)
        if self.kind == "cls":
            return class_scores(model, cls_score)[:, self.class_index : self.class_index + 1]
        if bbox_pred.shape[1] == 4:  # reg_class_agnostic
            return bbox_pred
        return bbox_pred[:, 4 * self.class_index : 4 * self.class_index + 4]

    def sampling_layers(self, model: nn.Module) -> List[Tuple[str, nn.Module]]:
        """The box head's RoI layers: one per FPN level (only the level the box maps to is called),
        or, with ``share_roi_layer=True``, the one layer all levels share (then ``roi_layers`` holds
        per-level views that are not modules; each call passes its level's ``spatial_scale``)."""
        extractor = model.roi_head.bbox_roi_extractor
        shared = getattr(extractor, "shared_roi_layer", None)
        if shared is not None:
            return [("roi_head.bbox_roi_extractor.shared_roi_layer", shared)]
        layers = [
            (f"roi_head.bbox_roi_extractor.roi_layers.{i}", layer)
            for i, layer in enumerate(getattr(extractor, "roi_layers", []))
        ]
        not_modules = [name for name, layer in layers if not isinstance(layer, nn.Module)]
        if not_modules:
            raise ValueError(
                f"{type(extractor).__name__}: RoI layers {not_modules} are not nn.Modules and "
                f"no shared_roi_layer is set; cannot hook them"
            )
        return layers


Node = Union[ConvNode, RoINode]


def last_residual_stage(model: nn.Module) -> Tuple[str, nn.Module]:
    backbone = model.backbone
    names = getattr(backbone, "res_layers", None)
    if not names:
        raise ValueError(
            f"conv nodes need a ResNet-style backbone (with res_layers); {type(backbone).__name__} has none"
        )
    return names[-1], getattr(backbone, names[-1])


def c5_stride(model: nn.Module) -> int:
    """Image pixels per pixel of the last c5 layer, from the backbone's architecture: the stride of
    its stem (the strided convolutions and poolings outside the residual stages -- conv1 and the
    max-pool, 4, in mmdet's ResNet; 2 in RegNet) times each residual stage's (``backbone.strides``).
    Not from the input's size: that need not be a multiple of it (``pad_size_divisor``)."""
    last_residual_stage(model)  # a ResNet-style backbone, or a clear error
    backbone = model.backbone
    stage_names = list(backbone.res_layers)
    strides = getattr(backbone, "strides", None)
    if strides is None or len(strides) < len(stage_names):
        raise ValueError(
            f"conv nodes need the backbone's per-stage strides (mmdet's ResNet family has "
            f"backbone.strides); {type(backbone).__name__} has none"
        )
    in_stages = {id(m) for name in stage_names for m in getattr(backbone, name).modules()}
    stride = 1
    for name, module in backbone.named_modules():
        if id(module) in in_stages or not isinstance(module, (nn.Conv2d, nn.MaxPool2d, nn.AvgPool2d)):
            continue
        step = as_pair(module.stride)
        if step[0] != step[1]:
            raise ValueError(f"backbone.{name} has stride {step}; conv nodes need square strides")
        stride *= step[0]
    for step in strides[: len(stage_names)]:
        step = as_pair(step)
        if step[0] != step[1]:
            raise ValueError(f"backbone stage stride {step}; conv nodes need square strides")
        stride *= step[0]
    return stride


def check_c5_size(stride: int, batch_size: Tuple[int, int], c5_size: Tuple[int, int]) -> None:
    """Every strided step of a ResNet is 'same'-padded (an n-pixel map becomes ceil(n/2)), so a
    stride-S c5 map of an H x W input is ceil(H/S) x ceil(W/S); anything else means the stride was
    not understood, and positions would be mapped wrongly."""
    expected = tuple(-(-size // stride) for size in batch_size)
    if tuple(c5_size) != expected:
        raise ValueError(
            f"the c5 map is {tuple(c5_size)} for a {tuple(batch_size)} input, but a stride-{stride} "
            f"backbone (from its architecture) gives {expected}; cannot place conv nodes"
        )


def as_pair(value) -> Tuple[int, int]:
    return tuple(value) if isinstance(value, (tuple, list)) else (value, value)


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
        raise ValueError(f"cls/reg nodes need a two-stage detector with a box head; {type(model).__name__} has none")
    feats = model.extract_feat(batch)
    rois = torch.cat(
        [
            torch.arange(batch.shape[0], dtype=batch.dtype, device=batch.device)[:, None],
            batch.new_tensor(box).expand(batch.shape[0], 4),
        ],
        dim=1,
    )
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
    """``KIND:WHERE[#INDEX]`` -> (kind, where, index); errors name the spec and the grammar.

    WHERE: ``detN`` (the N-th best detection: its box, or its centre for ``conv``) or coordinates in
    the original image (``X,Y`` for ``conv``, ``X1,Y1,X2,Y2`` for ``cls``/``reg``); INDEX: the c5
    channel (``conv``) or the class (``cls``/``reg``, default: the detected one).
    """
    kind, sep, rest = spec.partition(":")
    if not sep or kind not in NODE_KINDS:
        raise ValueError(
            f"--nodes {spec!r}: unknown node kind {kind!r}; expected KIND:WHERE[#INDEX] with KIND one "
            f"of {', '.join(NODE_KINDS)} (e.g. conv:det0, cls:det0, conv:64,40, reg:10,10,50,60#2)"
        )
    where, _, index = rest.partition("#")
    if index and not index.isdigit():
        raise ValueError(f"--nodes {spec!r}: the index after '#' must be a non-negative integer, got {index!r}")
    return kind, where, int(index) if index else None


def resolve_nodes(specs: Sequence[str], model: nn.Module, image: LoadedImage, detections) -> List[Node]:
    """Turn node specs into nodes, checked against the image, the c5 map and the detections; two
    specs resolving to the same node (same name: their files would overwrite each other) are an error."""
    nodes, seen = [], {}
    for spec in specs:
        node = _resolve(spec, model, image, detections)
        if node.name in seen:
            raise ValueError(
                f"--nodes {seen[node.name]!r} and {spec!r} both resolve to the same node {node.name} "
                f"({node.label}); give each node once"
            )
        seen[node.name] = spec
        nodes.append(node)
    return nodes


def _resolve(spec: str, model: nn.Module, image: LoadedImage, detections) -> Node:
    kind, where, index = parse_spec(spec)
    boxes, scores, labels = detections
    if where.startswith("det"):
        if not where[3:].isdigit():
            raise ValueError(f"--nodes {spec!r}: expected det<N> (e.g. det0), got {where!r}")
        rank = int(where[3:])
        if rank >= len(boxes):
            raise ValueError(
                f"--nodes {spec!r}: the detector found {len(boxes)} detection(s) with score >= the "
                f"--score-thr on {image.path}; det{rank} does not exist"
            )
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


def conv_node(
    model: nn.Module, image: LoadedImage, xy: Tuple[float, float], channel: Optional[int], spec: str
) -> ConvNode:
    height, width = image.size
    x, y = xy
    if not (0 <= x <= width - 1 and 0 <= y <= height - 1):
        raise ValueError(
            f"--nodes {spec!r}: position ({x:g}, {y:g}) is outside the network-input image "
            f"({width}x{height}; x in [0, {width - 1}], y in [0, {height - 1}])"
        )
    with torch.no_grad():
        batch = normalise(model, image.pixels[None].to(next(model.parameters())))
        c5 = last_c5_output(model, batch)
    stride = c5_stride(model)
    check_c5_size(stride, batch.shape[-2:], c5.shape[-2:])
    # Feature position u of a stride-S ResNet map is centred on image pixel S*u (see sampling_locations):
    # the nearest centre, ties upwards (not Python's round, which rounds half to even).
    row = min(math.floor(y / stride + 0.5), c5.shape[-2] - 1)
    col = min(math.floor(x / stride + 0.5), c5.shape[-1] - 1)
    if channel is not None and channel >= c5.shape[1]:
        raise ValueError(f"--nodes {spec!r}: channel {channel} out of range; the c5 layer has {c5.shape[1]}")
    return ConvNode(row, col, stride, channel)


def roi_node(
    model: nn.Module, image: LoadedImage, kind: str, box, class_index: Optional[int], source: str, spec: str
) -> RoINode:
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
