"""Samples -> model-ready numpy features, one sample at a time, as the model's processor would make them."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from .chat import ChatTokenizer, TextTooLong
from .formats import Sample, SampleError
from .model_info import ModelInfo, read_model_info
from .vision import VisionConfig, image_size, load_image, preprocess_image

TRUNCATION_STRATEGIES = ("delete", "right", "error")


@dataclass
class Features:
    """One tokenised sample: ids and labels [L], patches [n_patches, C*T*P*P], grids [n, 3]."""

    input_ids: np.ndarray
    labels: np.ndarray
    pixel_values: np.ndarray | None
    image_grid_thw: np.ndarray | None
    pixel_values_videos: np.ndarray | None = None
    video_grid_thw: np.ndarray | None = None
    second_per_grid_ts: np.ndarray | None = None
    """Seconds per temporal patch of each video (Qwen2/2.5-VL's M-RoPE time axis)."""


@dataclass
class VideoFeatures:
    pixel_values: np.ndarray
    grid_thw: np.ndarray
    second_per_grid_ts: float
    timestamps: list[float]
    """Seconds of each temporal patch (Qwen3-VL writes them into the text)."""


class SFTDataset:
    """Tokenises a conversation and patchifies its images and videos exactly as the model's processor would.

    `max_length` with `truncation`: a sample longer than `max_length` raises a `SampleError` of kind
    `too_long` (delete / error: the caller drops it or stops), or with `right` loses its trailing text
    -- never part of an image or video span, and never all of its answer tokens. With `delete` / `error`,
    a text too long by its character count alone (ChatTokenizer.max_chars_per_token) is refused without
    being tokenised, so a 20 MB record costs a render, not a tokenisation.
    """

    def __init__(
        self,
        samples: list[Sample],
        model_dir: str | Path,
        *,
        max_length: int,
        min_pixels: int | None = None,
        max_pixels: int | None = None,
        truncation: str = "error",
        video_overrides: dict | None = None,
        template_kwargs: dict | None = None,
    ):
        if truncation not in TRUNCATION_STRATEGIES:
            raise ValueError(f"truncation must be one of {TRUNCATION_STRATEGIES}, got {truncation!r}")
        self.samples = samples
        self.model_dir = Path(model_dir)
        self.tokenizer = ChatTokenizer(model_dir, template_kwargs)
        self.info: ModelInfo = read_model_info(model_dir)
        vision = VisionConfig.from_preprocessor_config(model_dir)
        overrides = {k: v for k, v in (("min_pixels", min_pixels), ("max_pixels", max_pixels)) if v is not None}
        self.vision = replace(vision, **overrides)
        self.video_overrides = {k: v for k, v in (video_overrides or {}).items() if v is not None}
        self._video_cfg = None
        self.max_length = max_length
        self.truncation = truncation

    def __len__(self) -> int:
        return len(self.samples)

    # -- media ---------------------------------------------------------------------------------

    def _image_tokens(self, grid: np.ndarray) -> int:
        return int(np.prod(grid)) // self.vision.merge_size**2

    def _images(self, sample: Sample) -> tuple[np.ndarray | None, np.ndarray | None]:
        if not sample.images:
            return None, None
        patches, grids = [], []
        for path in sample.images:
            try:
                pixels, grid = preprocess_image(load_image(path), self.vision)
            except ValueError as e:
                raise SampleError(f"{sample.where}: {e}", _media_kind(e)) from None
            patches.append(pixels)
            grids.append(grid)
        pixel_values = patches[0] if len(patches) == 1 else np.concatenate(patches)  # no 5 MB copy for one image
        return pixel_values, np.stack(grids).astype(np.int64)

    def _header_image_grid(self, sample: Sample, path) -> np.ndarray:
        """An image's patch grid from its header alone (what `measure` needs, without decoding)."""
        try:
            height, width = image_size(path)
            h, w = self.vision.resize_target(height, width)  # the family's rule (Qwen or Ovis2.5)
        except ValueError as e:
            raise SampleError(f"{sample.where}: {e}", _media_kind(e)) from None
        return np.array([1, h // self.vision.patch_size, w // self.vision.patch_size], dtype=np.int64)

    @property
    def video_config(self):
        if self._video_cfg is None:
            from .video import VideoConfig

            self._video_cfg = VideoConfig.from_preprocessor_config(self.model_dir, self.info.model_type, **self.video_overrides)
        return self._video_cfg

    def _videos(self, sample: Sample) -> list[VideoFeatures]:
        from .video import load_video, preprocess_video

        out = []
        for path in sample.videos:
            try:
                clip = load_video(path, self.video_config)
                pixels, grid, seconds_per_grid, timestamps = preprocess_video(clip, self.video_config)
            except ValueError as e:
                raise SampleError(f"{sample.where}: {e}", _media_kind(e)) from None
            out.append(VideoFeatures(pixels, np.asarray(grid, dtype=np.int64), seconds_per_grid, list(timestamps)))
        return out

    def _video_placeholder(self, video: VideoFeatures) -> str:
        """What a video's tag becomes: its pads in one span (Qwen2/2.5-VL; Ovis2.5 inside its video
        indicators), or per temporal patch `<t seconds><|vision_start|>pads<|vision_end|>` (Qwen3-VL's
        processor, outer wrapper kept)."""
        t, h, w = (int(x) for x in video.grid_thw)
        per_frame = h * w // self.vision.merge_size**2
        if self.info.family.media.video_placeholder == "pads":
            return self.tokenizer.video_placeholder(t * per_frame)
        pads = self.tokenizer.video_pads(per_frame)
        return "".join(f"<{video.timestamps[i]:.1f} seconds><|vision_start|>{pads}<|vision_end|>" for i in range(t))

    # -- tokens --------------------------------------------------------------------------------

    def _encode(self, sample: Sample, messages, image_grids, videos: list[VideoFeatures], prompt: bool = False,
                answer: dict | None = None):
        image_repl = [self.tokenizer.image_placeholder(self._image_tokens(g)) for g in image_grids]
        video_repl = [self._video_placeholder(v) for v in videos]
        try:
            if prompt:
                return self.tokenizer.encode_prompt(messages, image_repl, video_repl, answer=answer), None
            # `right` truncation keeps a long sample's head, so only the other policies may refuse early.
            max_tokens = self.max_length if self.truncation != "right" else None
            return self.tokenizer.encode_chat(messages, image_repl, video_repl, max_tokens=max_tokens)
        except TextTooLong as e:
            raise SampleError(
                f"{sample.where}: {e}; shorten the sample, raise model_max_length or set truncation_strategy: right",
                "too_long",
            ) from None
        except ValueError as e:
            raise SampleError(f"{sample.where}: {e}", "tag_count_mismatch") from None

    def tokens(self, index: int, decode: bool = True) -> tuple[np.ndarray, np.ndarray]:
        """(input_ids, labels) of sample `index` before any truncation.

        `decode=False` sizes images from their headers (the token count needs only the size), which
        makes a length check over a whole dataset cheap; a corrupt image body then surfaces only
        when the sample is built. Videos are always decoded: their frame sampling sets the count.
        """
        sample = self.samples[index]
        if decode:
            _, grid_thw = self._images(sample)
            grids = [] if grid_thw is None else list(grid_thw)
        else:
            grids = [self._header_image_grid(sample, p) for p in sample.images]
        return self._encode(sample, sample.messages, grids, self._videos(sample) if sample.videos else [])

    def check(self, index: int, decode: bool = False) -> tuple[int, bool]:
        """(tokens after the length policy, whether it truncated), or the SampleError training would hit."""
        input_ids, labels = self.tokens(index, decode)
        fitted, _ = self.fit(self.samples[index], input_ids, labels)
        return len(fitted), len(fitted) < len(input_ids)

    def fit(self, sample: Sample, input_ids: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if len(input_ids) <= self.max_length:
            return input_ids, labels
        too_long = f"{sample.where}: {len(input_ids)} tokens exceed model_max_length {self.max_length}"
        if self.truncation != "right":
            raise SampleError(f"{too_long} (raise model_max_length, lower max_pixels, or set truncation_strategy)", "too_long")
        cut = self.max_length
        if self.tokenizer.open_spans(input_ids[:cut]) != 0:
            raise SampleError(f"{too_long}, and cutting there would split an image/video span", "too_long")
        if not (labels[:cut] != -100).any():
            raise SampleError(f"{too_long}, and cutting there would leave no answer token", "too_long")
        return input_ids[:cut], labels[:cut]

    def __getitem__(self, index: int) -> Features:
        sample = self.samples[index]
        pixel_values, grid_thw = self._images(sample)
        videos = self._videos(sample) if sample.videos else []
        input_ids, labels = self._encode(sample, sample.messages, [] if grid_thw is None else list(grid_thw), videos)
        input_ids, labels = self.fit(sample, input_ids, labels)
        return Features(input_ids, labels, pixel_values, grid_thw, *_stack_videos(videos))

    def prompt(self, index: int, features: Features | None = None, as_trained: bool = False) -> tuple[Features, str]:
        """The sample without its last answer, ending in the generation prompt, and that answer.

        Pass the sample's `features` (from `dataset[index]`) to reuse its image and video patches
        instead of decoding them a second time. `as_trained` (evaluation against that answer): the prompt
        ends where the answer's trained tokens start, as training showed it (ChatTokenizer.encode_prompt).
        """
        sample = self.samples[index]
        if features is None:
            features = self[index]
        grids = [] if features.image_grid_thw is None else list(features.image_grid_thw)
        videos = self._videos(sample) if sample.videos else []
        *context, answer = sample.messages
        input_ids, _ = self._encode(sample, context, grids, videos, prompt=True, answer=answer if as_trained else None)
        labels = np.full_like(input_ids, -100)
        answer_text = answer["content"] if isinstance(answer["content"], str) else "".join(p.get("text", "") for p in answer["content"])
        return replace(features, input_ids=input_ids, labels=labels), answer_text


def _stack_videos(videos: list[VideoFeatures]) -> tuple:
    if not videos:
        return None, None, None
    return (
        np.concatenate([v.pixel_values for v in videos]),
        np.stack([v.grid_thw for v in videos]),
        np.asarray([v.second_per_grid_ts for v in videos], dtype=np.float32),
    )


def _media_kind(error: ValueError) -> str:
    """The problem class of a media error (ImageLoadError / VideoLoadError carry one), for the data report."""
    return getattr(error, "kind", "corrupt_media")
