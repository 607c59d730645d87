"""The detector and image plumbing the three spatial-support views share.

Every view differentiates or re-evaluates a node's response as a function of the image, so the image
must enter the network through a path autograd can follow and in any dtype (the finite-difference
tests run in float64). mmengine's data preprocessor casts to float32, so :func:`normalise` repeats
its three steps (BGR->RGB, (x - mean) / std, padding to the size divisor) in the input's dtype.

Coordinates: everything is analysed and drawn in the **network-input image** (after the test
pipeline's resize, before padding), in pixel-index units (pixel centres at integers). Node positions
given by a user are in the original image and are scaled by the pipeline's ``scale_factor``.
"""

import os.path as osp
from dataclasses import dataclass
from typing import Optional, Sequence, Tuple

import torch
from torch import Tensor, nn


@dataclass
class LoadedImage:
    """One image as the detector sees it."""

    path: str
    pixels: Tensor  # (3, H, W) float, the pipeline's channel order (BGR for mmdet), 0-255, unpadded
    scale_factor: Tuple[float, float]  # (w, h): network input = original * scale_factor
    data_sample: object  # the pipeline's DetDataSample (meta information for predict)

    @property
    def size(self) -> Tuple[int, int]:
        """(height, width) of the network input."""
        return tuple(self.pixels.shape[-2:])

    def rgb(self) -> Tensor:
        """(H, W, 3) uint8 RGB, for drawing."""
        return self.pixels.flip(0).permute(1, 2, 0).clamp(0, 255).round().to(torch.uint8)


def load_detector(config: str, checkpoint: str, device: str = "cpu", cfg_options: Optional[dict] = None) -> nn.Module:
    """An mmdet detector in eval mode, from a config file (with our ``custom_imports``) and a checkpoint."""
    for argument, path in (("config", config), ("checkpoint", checkpoint)):
        if not osp.isfile(path):
            raise FileNotFoundError(f"{argument} {path!r} does not exist")
    from mmdet.apis import init_detector
    from mmengine.config import Config

    import mmdet_dcnv2  # noqa: F401  (registers our layers and the checkpoint allow-list)

    cfg = Config.fromfile(config)
    if cfg_options:
        cfg.merge_from_dict(cfg_options)
    model = init_detector(cfg, checkpoint, device=device)
    model.eval()
    return model


def load_image(model: nn.Module, path: str) -> LoadedImage:
    """Read ``path`` through the detector's test pipeline (without its annotation loading)."""
    if not osp.isfile(path):
        raise FileNotFoundError(f"image {path!r} does not exist")
    from mmcv.transforms import Compose
    from mmdet.utils import get_test_pipeline_cfg

    steps = [step for step in get_test_pipeline_cfg(model.cfg) if "LoadAnnotations" not in step["type"]]
    packed = Compose(steps)(dict(img_path=path, img_id=0))
    sample = packed["data_samples"]
    scale = sample.metainfo.get("scale_factor", (1.0, 1.0))
    return LoadedImage(path, packed["inputs"].float(), (float(scale[0]), float(scale[1])), sample)


def normalise(model: nn.Module, pixels: Tensor, keep: Optional[Tensor] = None) -> Tensor:
    """What the model's ``DetDataPreprocessor`` does to a (B, 3, H, W) batch, differentiably, in its dtype.

    ``keep`` (H, W) or (B, H, W), 1 where the image stays and 0 where it is masked: masked pixels
    become the dataset mean (0 after normalisation) -- the neutral value the saliency search uses.
    """
    pre = model.data_preprocessor
    x = pixels[:, [2, 1, 0]] if getattr(pre, "_channel_conversion", False) else pixels
    if getattr(pre, "_enable_normalize", False):
        x = (x - pre.mean.to(x)) / pre.std.to(x)
    if keep is not None:
        x = x * (keep.to(x) if keep.dim() == 4 else keep.to(x).unsqueeze(-3))
    divisor = int(getattr(pre, "pad_size_divisor", 1))
    height, width = x.shape[-2:]
    pad_h, pad_w = (-height) % divisor, (-width) % divisor
    if pad_h or pad_w:
        x = nn.functional.pad(x, (0, pad_w, 0, pad_h), value=float(getattr(pre, "pad_value", 0)))
    return x


def detect(model: nn.Module, image: LoadedImage, score_thr: float):
    """Detections (boxes in network-input coordinates, scores, labels), best first, score >= score_thr."""
    with torch.no_grad():
        batch = normalise(model, image.pixels[None].to(next(model.parameters())))  # its device and dtype
        sample = image.data_sample.clone()
        sample.set_metainfo({"batch_input_shape": tuple(batch.shape[-2:]), "pad_shape": tuple(batch.shape[-2:])})
        result = model.predict(batch, [sample], rescale=False)[0].pred_instances
    keep = result.scores >= score_thr
    order = torch.argsort(result.scores[keep], descending=True)
    return result.bboxes[keep][order], result.scores[keep][order], result.labels[keep][order]


def class_names(model: nn.Module) -> Sequence[str]:
    return tuple((getattr(model, "dataset_meta", None) or {}).get("classes", ()))
