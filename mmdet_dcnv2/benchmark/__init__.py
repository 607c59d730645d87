"""The shapes benchmark's pieces (docs/main_job.md): the arms compared, the pretrained backbone, paired
initial weights, run directories, one training run and the report. ``mmdet_dcnv2.tools.demo`` is the
command that puts them together."""
