"""vltune: fine-tune Qwen-family vision-language models on PyTorch (CUDA) and MindSpore (Ascend).

The Python API mirrors the command line: `vltune.train(recipe)` is `vltune train RECIPE`, and
`vltune.load(model_dir).chat(prompt, images=[...])` is `vltune infer --model DIR --image P --prompt T`.
"""

__version__ = "0.1.0"


def train(config, overrides=None, show_progress: bool = True) -> dict:
    """Run a recipe (a dict of recipe keys, a YAML path or a bundled recipe name) and return its summary.

    Imported lazily so that `import vltune` stays cheap and framework-free.
    """
    from vltune.training import train as _train

    return _train(config, overrides, show_progress=show_progress)


def load(model_dir, adapter=None, *, backend: str = "torch", min_pixels=None, max_pixels=None):
    """Load a model directory (plus a LoRA adapter directory) once; `.chat(prompt, images=..., thinking=...)`
    on the result answers prompts and returns an `Answer` (`.prediction`, `.thinking`). See vltune/chat.py.

    Imported lazily, as `train` is.
    """
    from vltune.chat import load as _load

    return _load(model_dir, adapter, backend=backend, min_pixels=min_pixels, max_pixels=max_pixels)
