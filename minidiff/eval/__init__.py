"""Judging results: distances that need no weights (metrics.py), the shipped character / pose classifier
(classifier.py), and what trains and what a LoRA file holds (audit.py; `python -m minidiff.audit`)."""
