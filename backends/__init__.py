"""Engines that implement core.contracts.TrainBackend: torch/ now, mindspore/ to come."""
