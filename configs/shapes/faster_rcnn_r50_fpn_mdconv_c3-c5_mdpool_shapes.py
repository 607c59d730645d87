# DCNv2 + modulated deformable RoI pooling (the paper's Table 1 row "mdconv c3-c5 + mdpool"):
# faster_rcnn_r50_fpn_mdconv_c3-c5_shapes.py with MDPool (7x7 bins, 2x2 samples per bin) in place of
# RoIAlign at every FPN level. MDPool's fc branches keep the normal learning rate (paper, Sec. 3).
_base_ = './faster_rcnn_r50_fpn_mdconv_c3-c5_shapes.py'

model = dict(
    roi_head=dict(
        bbox_roi_extractor=dict(
            type='RegistrySingleRoIExtractor',
            roi_layer=dict(_delete_=True, type='MDPool', output_size=7, output_channels=64,
                           deform_fc_channels=256, sampling_ratio=2))))
