"""Command-line tools of the mmseg path; ``tools/*.py`` are thin wrappers around them.

- :mod:`.train`: train from an mmseg config, writing prompt checkpoints (``tools/train.py``);
- :mod:`.test`: evaluate a prompt checkpoint or a Runner ``.pth`` (``tools/test.py``);
- :mod:`.infer`: masks and overlays for images (``tools/infer.py``);
- :mod:`.extract_prompts`: a Runner ``.pth`` to a prompt checkpoint (``tools/extract_prompts.py``).

Each has ``main(argv=None) -> int`` and runs as ``python -m promptmatch.mmseg.cli.<name>``.
"""
