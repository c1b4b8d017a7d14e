"""Pretrained feature extractors ("towers") that install offline from PyPI."""
