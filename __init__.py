"""vltune: fine-tune Qwen-family vision-language models on PyTorch (CUDA) and MindSpore (Ascend).

The Python API mirrors the command line: `vltune.train(recipe)` is `vltune train RECIPE`.
"""

__version__ = "0.1.0"


def train(config, overrides=None, show_progress: bool = True) -> dict:
    """Run a recipe (a dict of recipe keys, a YAML path or a bundled recipe name) and return its summary.

    Imported lazily so that `import vltune` stays cheap and framework-free.
    """
    from vltune.training import train as _train

    return _train(config, overrides, show_progress=show_progress)
