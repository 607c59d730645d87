"""Command-line jobs: ``python -m mmdet_dcnv2.tools.demo`` trains, evaluates and draws a DCNv2
detector on the embedded shapes dataset."""
