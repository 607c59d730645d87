"""R-CNN feature mimicking end to end on shrunk detectors: the losses, where their gradients go,
training (in-process and with the Runner), the edges, and inference/checkpoints equal to the stock
detector's."""

import os

import pytest
import torch

pytest.importorskip("mmdet")

from mmdet.registry import MODELS  # noqa: E402
from mmdet.structures.bbox import HorizontalBoxes  # noqa: E402
from mmdet.testing import demo_mm_inputs  # noqa: E402
from mmengine.config import Config  # noqa: E402
from mmengine.runner import Runner, load_checkpoint  # noqa: E402
from torchvision.ops import roi_align  # noqa: E402

from mmdet_dcnv2.models import MDConv, MDPool, MimicFasterRCNN, MimicMaskRCNN, RCNNMimicRoIHead  # noqa: E402
from mmdet_dcnv2.models.roi_heads import crop_and_resize, pool_patches, rcnn_mimic_roi_head, shared_fc_features  # noqa: E402,E501
from mmdet_tiny import OUR_CONFIGS, make_tiny_coco, rpn_proposals_in_float32, tiny_config, tiny_options  # noqa: E402

FASTER = "faster_rcnn_r50_fpn_mdconv_c3-c5_mdpool_mimic_1x_coco"
MASK = "mask_rcnn_r50_fpn_mdconv_c3-c5_mdpool_mimic_1x_coco"
REGULAR = "faster_rcnn_r50_fpn_mimic_1x_coco"
# 64x64 images: 32-pixel crops (which land on P2, an 8x8 map), a few RoIs per image.
SMALL_MIMIC = {"model.roi_head.crop_size": 32, "model.roi_head.num_rois": 4}


pytestmark = pytest.mark.usefixtures("mmdet_scope")


def _cfg(name, **extra):
    return tiny_config(name, **{**(SMALL_MIMIC if "mimic" in name else {}), **extra})


def _build(name, seed=0, **extra):
    torch.manual_seed(seed)
    model = MODELS.build(_cfg(name, **extra).model)
    model.init_weights()
    return model


def _batch(model, num_items=(2, 1), training=True, boxes=None):
    packed = demo_mm_inputs(
        batch_size=len(num_items),
        image_shapes=[(3, 64, 64), (3, 64, 48)][: len(num_items)],
        num_items=list(num_items),
        num_classes=80,
        with_mask=True,
    )
    if boxes is not None:
        for sample, image_boxes in zip(packed["data_samples"], boxes):
            sample.gt_instances.bboxes = HorizontalBoxes(torch.tensor(image_boxes, dtype=torch.float32))
    return model.data_preprocessor(packed, training)


def _total(losses):
    return sum(v.sum() if torch.is_tensor(v) else sum(x.sum() for x in v) for k, v in losses.items() if "loss" in k)


def _finite(losses):
    return all(torch.isfinite(v).all() for k, v in losses.items() if torch.is_tensor(v))


@pytest.mark.parametrize("name", [FASTER, MASK, REGULAR])
def test_each_mimic_config_trains_a_step_with_both_losses(name):
    model = _build(name)
    assert type(model) is (MimicMaskRCNN if name == MASK else MimicFasterRCNN)
    assert isinstance(model.roi_head, RCNNMimicRoIHead)
    assert any(isinstance(m, MDConv) for m in model.modules()) == (name != REGULAR)
    assert any(isinstance(m, MDPool) for m in model.roi_head.bbox_roi_extractor.modules()) == (name != REGULAR)
    model.train()
    losses = model(**_batch(model), mode="loss")
    assert {"loss_mimic", "loss_rcnn_cls", "loss_cls", "loss_bbox"} <= set(losses)
    assert ("loss_mask" in losses) == (name == MASK)
    assert _finite(losses) and losses["loss_mimic"] > 0 and losses["loss_rcnn_cls"] > 0
    _total(losses).backward()
    assert model.roi_head.rcnn_cls.weight.grad.abs().sum() > 0


def _capture_backbone_outputs(model):
    """Each backbone call's outputs, kept with their gradients: the first call is the detector's own
    images (the Fast R-CNN branch), the second the crops (the R-CNN branch)."""
    calls = []

    def keep(module, args, outputs):
        for out in outputs:
            if out.requires_grad:  # not the frozen stage's
                out.retain_grad()
        calls.append(outputs)

    model.backbone.register_forward_hook(keep)
    return calls


def test_loss_mimic_reaches_the_backbone_through_both_branches_and_the_classifier_only_through_its_loss():
    model = _build(FASTER)
    model.train()
    calls = _capture_backbone_outputs(model)
    losses = model(**_batch(model), mode="loss")
    assert len(calls) == 2
    head = model.roi_head

    losses["loss_mimic"].backward(retain_graph=True)
    for branch in calls:
        assert any(out.grad is not None and out.grad.abs().sum() > 0 for out in branch)
    # (each block's residual branch starts switched off -- norm3 is zero-initialised -- so look at a
    # shortcut's weights)
    assert model.backbone.layer2[0].downsample[0].weight.grad.abs().sum() > 0
    assert head.rcnn_cls.weight.grad is None  # the R-CNN classifier is no part of eq. 3

    model.zero_grad(set_to_none=True)
    for out in calls[0] + calls[1]:
        out.grad = None
    losses["loss_rcnn_cls"].backward()
    assert head.rcnn_cls.weight.grad.abs().sum() > 0
    assert all(out.grad is None for out in calls[0])  # cross-entropy on the crops only
    assert any(out.grad is not None and out.grad.abs().sum() > 0 for out in calls[1])


def test_overfitting_one_batch_lowers_the_losses():
    model = _build(FASTER, seed=1)
    model.train()
    data = _batch(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    history = []
    torch.manual_seed(1)
    for _ in range(30):
        losses = model(**data, mode="loss")
        total = _total(losses)
        optimizer.zero_grad()
        total.backward()
        optimizer.step()
        history.append((total.item(), losses["loss_rcnn_cls"].item()))
    first, last = history[:5], history[-5:]
    for column in (0, 1):  # total loss; the R-CNN classifier's loss
        assert sum(h[column] for h in last) < sum(h[column] for h in first), history


def test_the_runner_trains_and_logs_both_new_losses(tmp_path):
    make_tiny_coco(str(tmp_path / "data"))
    cfg = _cfg(FASTER)
    cfg.merge_from_dict(tiny_options(cfg, str(tmp_path / "data"), str(tmp_path / "work")))
    cfg.val_cfg = cfg.val_dataloader = cfg.val_evaluator = None
    runner = Runner.from_cfg(cfg)
    runner.train()
    for key in ("train/loss_mimic", "train/loss_rcnn_cls"):
        scalar = runner.message_hub.get_scalar(key)
        assert len(scalar.data[0]) == 2 and all(v == v for v in scalar.data[0]), key  # 2 iterations, no NaN
    with open(os.path.join(runner.log_dir, f"{runner.timestamp}.log")) as log:
        text = log.read()
    assert "loss_mimic:" in text and "loss_rcnn_cls:" in text


def test_inference_and_checkpoints_are_the_stock_detectors(tmp_path, capsys):
    keep_every_box = {"model.test_cfg.rcnn.score_thr": 0.0}  # an untrained model scores ~1/81
    mimic = _build(FASTER, seed=3, **keep_every_box)
    path = str(tmp_path / "mimic.pth")
    torch.save({"state_dict": mimic.state_dict()}, path)
    stock = MODELS.build(_cfg(FASTER.replace("_mimic", ""), **keep_every_box).model)
    assert type(stock).__name__ == "FasterRCNN" and type(stock.roi_head).__name__ == "StandardRoIHead"

    capsys.readouterr()
    load_checkpoint(stock, path, map_location="cpu")  # mmengine's loader: reports, does not raise
    report = capsys.readouterr().out
    assert "unexpected key in source state_dict: roi_head.rcnn_cls.weight, roi_head.rcnn_cls.bias" in report
    assert "missing keys" not in report

    mimic.eval()
    stock.eval()
    data = _batch(mimic, training=False)
    with torch.no_grad():
        ours, theirs = (m.predict(data["inputs"], data["data_samples"]) for m in (mimic, stock))
        raw = [m._forward(data["inputs"], data["data_samples"]) for m in (mimic, stock)]
    for a, b in zip(ours, theirs):
        assert len(a.pred_instances) > 0
        for key in ("bboxes", "scores", "labels"):
            assert torch.equal(a.pred_instances[key], b.pred_instances[key]), key
    for a, b in zip(raw[0][0], raw[1][0]):
        assert torch.equal(a, b)


def test_mask_rcnn_mimics_on_the_classification_branch_only():
    model = _build(MASK)
    model.train()
    losses = model(**_batch(model), mode="loss")
    losses["loss_mimic"].backward(retain_graph=True)
    assert all(p.grad is None for p in model.roi_head.mask_head.parameters())
    assert all(p.grad is None for p in model.roi_head.mask_roi_extractor.parameters())
    losses["loss_mask"].backward()
    assert any(p.grad is not None for p in model.roi_head.mask_head.parameters())


def test_bfloat16_autocast_step():
    model = _build(MASK)
    rpn_proposals_in_float32(model.rpn_head)
    model.train()
    data = _batch(model)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        losses = model(**data, mode="loss")
    assert _finite(losses) and losses["loss_mimic"].dtype == losses["loss_rcnn_cls"].dtype == torch.float32
    _total(losses).backward()
    assert torch.isfinite(model.roi_head.rcnn_cls.weight.grad).all()
    assert model.roi_head.rcnn_cls.weight.grad.abs().sum() > 0


def test_no_positive_roi_anywhere_gives_zero_losses_that_keep_the_graph():
    model = _build(FASTER)
    model.train()
    calls = _capture_backbone_outputs(model)
    losses = model(**_batch(model, num_items=(0, 0)), mode="loss")
    assert len(calls) == 1  # no crop was run
    for key in ("loss_mimic", "loss_rcnn_cls"):
        assert losses[key].item() == 0 and losses[key].grad_fn is not None, key
    _total(losses).backward()
    grad = model.roi_head.rcnn_cls.weight.grad
    assert grad is not None and torch.equal(grad, torch.zeros_like(grad))  # a gradient, for DDP's sake


@pytest.mark.parametrize("mimic_on", ["bg", "all"])
def test_background_and_all_roi_ablations_train(mimic_on):
    model = _build(FASTER, **{"model.roi_head.mimic_on": mimic_on})
    model.train()
    losses = model(**_batch(model, num_items=(0, 1)), mode="loss")  # bg RoIs exist even without objects
    assert _finite(losses) and losses["loss_mimic"] > 0 and losses["loss_rcnn_cls"] > 0


def test_tiny_and_elongated_rois_are_cropped_and_mimicked(monkeypatch):
    model = _build(FASTER, **{"model.roi_head.num_rois": 32})  # every positive, the ground truths among them
    model.train()
    cropped = []

    def recording_crop(images, rois, size):
        cropped.append(rois.detach().clone())
        return crop_and_resize(images, rois, size)

    monkeypatch.setattr(rcnn_mimic_roi_head, "crop_and_resize", recording_crop)
    # Ground truths become positive RoIs (add_gt_as_proposals): half a pixel square, thin, flat. (A
    # zero-size one would make mmdet's box-delta targets log(0); crop_and_resize's own test covers it.)
    boxes = [[[10.0, 10.0, 10.5, 10.5], [5.0, 5.0, 5.5, 60.0], [0.0, 30.0, 64.0, 30.5]], [[20.0, 20.0, 21.0, 21.0]]]
    losses = model(**_batch(model, num_items=(3, 1), boxes=boxes), mode="loss")
    assert _finite(losses) and losses["loss_mimic"] > 0
    crops = cropped[0].tolist()
    for image, image_boxes in enumerate(boxes):
        for box in image_boxes:
            assert any(row[0] == image and row[1:] == pytest.approx(box) for row in crops), box
    _total(losses).backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_crop_and_resize():
    torch.manual_seed(0)
    images = torch.randn(2, 3, 40, 50)
    rois = torch.tensor([[0, 3.0, 4.0, 30.0, 20.0], [1, 0.0, 0.0, 50.0, 40.0], [1, 10.0, 12.0, 13.0, 14.0]])
    crops = crop_and_resize(images, rois, 16)
    # RoIAlign (aligned), adaptive samples: averaging where shrunk, bilinear where enlarged
    torch.testing.assert_close(crops, roi_align(images, rois, 16, 1.0, 0, aligned=True))
    point = crop_and_resize(images, torch.tensor([[0, 7.0, 9.0, 7.0, 9.0]]), 4)  # widened to 1x1 about its centre
    torch.testing.assert_close(
        point, roi_align(images, torch.tensor([[0, 6.5, 8.5, 7.5, 9.5]]), 4, 1.0, 0, aligned=True)
    )
    assert point.abs().sum() > 0


def test_patches_keep_their_own_crop_under_bfloat16_beyond_256_crops(monkeypatch):
    """RoI layers cast RoIs to the features' dtype; bfloat16 rounds batch indices above 256."""
    extractor = _build(FASTER).roi_head.bbox_roi_extractor  # MDPool at 7x7; a 32-pixel patch is on P2
    torch.manual_seed(0)
    feats = tuple(torch.randn(300, 32, 8 >> level, 8 >> level, dtype=torch.bfloat16) for level in range(4))

    def pooled_rows():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            together = pool_patches(extractor, feats, 32)
            alone = [pool_patches(extractor, tuple(f[i : i + 1] for f in feats), 32) for i in (0, 257, 299)]
        return together[[0, 257, 299]], torch.cat(alone)

    together, alone = pooled_rows()
    assert together.dtype == torch.bfloat16 and torch.equal(together, alone)
    # In one call, index 299 would round to 300 (the CPU kernel refuses it; CUDA's, which does not
    # check, would pool a neighbour's crop): the chunking is what this test sees.
    monkeypatch.setattr(rcnn_mimic_roi_head, "PATCHES_PER_CALL", 10**6)
    with pytest.raises(ValueError, match="got 300 in row 299"):
        pooled_rows()


def test_a_224_pixel_patch_is_pooled_from_p4():
    extractor = MODELS.build(
        Config.fromfile(os.path.join(OUR_CONFIGS, f"{FASTER}.py")).model.roi_head.bbox_roi_extractor
    )
    assert extractor.map_roi_levels(torch.tensor([[0.0, 0.0, 0.0, 224.0, 224.0]]), 4).tolist() == [2]  # P2..P5


def test_shared_fc_features_is_the_feature_the_bbox_head_classifies():
    head = _build(FASTER).roi_head.bbox_head
    feats = torch.randn(3, 32, 7, 7)
    cls_score, _ = head(feats)
    torch.testing.assert_close(head.fc_cls(shared_fc_features(head, feats)), cls_score)


@pytest.mark.parametrize(
    "change, error, message",
    [
        ({"model.roi_head.mimic_on": "foreground"}, ValueError, r"mimic_on must be one of \('fg', 'bg', 'all'\)"),
        ({"model.roi_head.num_rois": 0}, ValueError, "num_rois must be a positive int, got 0"),
        ({"model.roi_head.crop_size": 224.0}, ValueError, "crop_size must be a positive int, got 224.0"),
        (
            {
                "model.roi_head.bbox_head.type": "ConvFCBBoxHead",
                "model.roi_head.bbox_head.num_shared_fcs": 0,
                "model.roi_head.bbox_head.num_cls_fcs": 1,
                "model.roi_head.bbox_head.num_reg_fcs": 1,
            },
            ValueError,
            "bbox_head must be a ConvFCBBoxHead with shared fcs",
        ),
        (
            {"model.roi_head.type": "StandardRoIHead"},
            TypeError,
            r"roi_head must be an RCNNMimicRoIHead.*use FasterRCNN",
        ),
    ],
)
def test_bad_config_fails_at_build_time(change, error, message):
    cfg = _cfg(FASTER, **change)
    if change.get("model.roi_head.type") == "StandardRoIHead":
        for key in ("num_rois", "crop_size", "mimic_on", "loss_mimic", "loss_rcnn_cls"):
            cfg.model.roi_head.pop(key)
    with pytest.raises(error, match=message):
        MODELS.build(cfg.model)


def test_the_head_in_a_stock_detector_says_which_detector_to_use():
    cfg = _cfg(FASTER)
    cfg.model.type = "FasterRCNN"
    model = MODELS.build(cfg.model)
    model.train()
    with pytest.raises(RuntimeError, match="needs the input images in training: build the detector as MimicFasterRCNN"):
        model(**_batch(model), mode="loss")
