"""The data pipeline: conversation files -> tokens, labels and image patches -> numpy batches.

numpy, PIL, jinja2 and `tokenizers` only; a test fails if anything here imports torch or mindspore,
so both backends train on byte-identical batches.
"""
