"""`vltune convert`: checkpoints between HF format and MindSpeed-MM's tensor/pipeline-parallel layout.

`layout.py` holds the numpy-only plan (sizes, pipeline placement, name table, row orders);
`mindspeed.py` applies it to torch tensors and reads and writes the files.
"""

from .layout import ConvertError, ModelDims, PipelineLayout, parse_layer_list
from .mindspeed import hf_to_mindspeed, mindspeed_to_hf, read_mindspeed

__all__ = [
    "ConvertError", "ModelDims", "PipelineLayout", "hf_to_mindspeed", "mindspeed_to_hf", "parse_layer_list",
    "read_mindspeed",
]
