"""Backend-neutral core: configuration, position math, schedules, metrics and the training loop.

numpy and the standard library only; a test fails if anything here imports torch or mindspore.
"""
