"""Samples -> model-ready numpy features, one sample at a time."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from .chat import ChatTokenizer
from .formats import Sample, SampleError
from .model_info import ModelInfo, read_model_info
from .vision import VisionConfig, load_image, preprocess_image


@dataclass
class Features:
    """One tokenised sample: ids and labels [L], patches [n_patches, C*T*P*P], grids [n_images, 3]."""

    input_ids: np.ndarray
    labels: np.ndarray
    pixel_values: np.ndarray | None
    image_grid_thw: np.ndarray | None


class SFTDataset:
    """Tokenises a conversation and patchifies its images exactly as the model's processor would."""

    def __init__(
        self,
        samples: list[Sample],
        model_dir: str | Path,
        *,
        max_length: int,
        min_pixels: int | None = None,
        max_pixels: int | None = None,
    ):
        self.samples = samples
        self.tokenizer = ChatTokenizer(model_dir)
        self.info: ModelInfo = read_model_info(model_dir)
        vision = VisionConfig.from_preprocessor_config(model_dir)
        overrides = {k: v for k, v in (("min_pixels", min_pixels), ("max_pixels", max_pixels)) if v is not None}
        self.vision = replace(vision, **overrides)
        self.max_length = max_length

    def __len__(self) -> int:
        return len(self.samples)

    def _images(self, sample: Sample) -> tuple[np.ndarray | None, np.ndarray | None, list[int]]:
        if not sample.images:
            return None, None, []
        patches, grids = [], []
        for path in sample.images:
            try:
                pixels, grid = preprocess_image(load_image(path), self.vision)
            except ValueError as e:
                raise SampleError(f"{sample.where}: {e}") from None
            patches.append(pixels)
            grids.append(grid)
        grid_thw = np.stack(grids).astype(np.int64)
        return np.concatenate(patches), grid_thw, self._token_counts(grid_thw)

    def _token_counts(self, grid_thw: np.ndarray | None) -> list[int]:
        """LLM tokens per image: patches / merge_size**2."""
        merge = self.vision.merge_size**2
        return [] if grid_thw is None else [int(g.prod()) // merge for g in grid_thw]

    def __getitem__(self, index: int) -> Features:
        sample = self.samples[index]
        pixel_values, grid_thw, n_tokens = self._images(sample)
        try:
            input_ids, labels = self.tokenizer.encode_chat(sample.messages, n_tokens)
        except ValueError as e:
            raise SampleError(f"{sample.where}: {e}") from None
        if len(input_ids) > self.max_length:
            raise SampleError(
                f"{sample.where}: {len(input_ids)} tokens exceed model_max_length {self.max_length} "
                "(raise model_max_length or lower max_pixels)"
            )
        return Features(input_ids, labels, pixel_values, grid_thw)

    def prompt(self, index: int, features: Features | None = None) -> tuple[Features, str]:
        """The sample without its last answer, ending in the generation prompt, and that answer.

        Pass the sample's `features` (from `dataset[index]`) to reuse its image patches instead of
        decoding and resizing the images a second time.
        """
        sample = self.samples[index]
        if features is None:
            pixel_values, grid_thw, n_tokens = self._images(sample)
        else:
            pixel_values, grid_thw = features.pixel_values, features.image_grid_thw
            n_tokens = self._token_counts(grid_thw)
        *context, answer = sample.messages
        input_ids = self.tokenizer.encode_prompt(context, n_tokens)
        labels = np.full_like(input_ids, -100)
        return Features(input_ids, labels, pixel_values, grid_thw), answer["content"]
