"""The MindSpore engine (native Qwen VL models, msrun). Not implemented yet: a recipe with
`backend: mindspore` is rejected by core.config.validate with a message saying so."""
