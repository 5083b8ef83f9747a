"""Turn a canonical conversation into model inputs: token ids, labels, and vision tensors.

Text is rendered with the processor's own chat template, one assistant turn at a time, so the tokens that
get a loss are known exactly (the assistant's reply and its end-of-turn token; never the system or user
turns, the `<|im_start|>assistant\\n` header or a vision pad token). Each `<|image_pad|>`/`<|video_pad|>`
is expanded in id space to the number of tokens the processor's grid gives, exactly as the processor does.
Vision tensors come from the real image/video processors, with Qwen's pixel budgets applied per item.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from finetune.data.conversation import DataError, Sample
from finetune.data.media import FRAME_FACTOR, VideoSettings, load_image, load_video

IGNORE_INDEX = -100


@dataclass
class VisionSettings:
    min_pixels: int
    max_pixels: int
    video_min_pixels: int
    video_max_pixels: int
    video_total_pixels: int
    video: VideoSettings = field(default_factory=VideoSettings)

    @classmethod
    def from_model_config(cls, model_cfg) -> "VisionSettings":
        return cls(
            min_pixels=model_cfg.min_pixels,
            max_pixels=model_cfg.max_pixels,
            video_min_pixels=model_cfg.video_min_pixels,
            video_max_pixels=model_cfg.video_max_pixels,
            video_total_pixels=model_cfg.video_total_pixels,
            video=VideoSettings(model_cfg.video_fps, model_cfg.video_min_frames, model_cfg.video_max_frames),
        )

    def video_frame_max_pixels(self, nframes: int) -> int:
        """Per-frame pixel cap: the total budget shared by all frames, as qwen-vl-utils' `fetch_video` does.
        We apply it ourselves and call the processor with `cap_pixels_per_frame=False`, so the budget comes from
        the recipe (not the processor's built-in 128k-token context assumption) and is applied exactly once."""
        share = self.video_total_pixels / nframes * FRAME_FACTOR
        return int(max(min(self.video_max_pixels, share), int(self.video_min_pixels * 1.05)))


@dataclass
class EncodedSample:
    input_ids: list[int]
    labels: list[int]
    mm_token_type_ids: list[int]
    pixel_values: torch.Tensor | None = None
    image_grid_thw: torch.Tensor | None = None
    pixel_values_videos: torch.Tensor | None = None
    video_grid_thw: torch.Tensor | None = None
    second_per_grid_ts: list[float] | None = None

    @property
    def num_trained_tokens(self) -> int:
        return sum(1 for label in self.labels if label != IGNORE_INDEX)


class ConversationEncoder:
    def __init__(self, processor, vision: VisionSettings, label_mode: str = "assistant", max_length: int | None = None):
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.vision = vision
        self.label_mode = label_mode
        self.max_length = max_length
        self.image_pad_id = processor.image_token_id
        self.video_pad_id = processor.video_token_id
        self.merge_length = processor.image_processor.merge_size**2
        self.temporal_patch_size = processor.video_processor.temporal_patch_size
        # Qwen2.5-VL spaces video frames in absolute time; Qwen2-VL has no such input.
        self.uses_time = "second_per_grid_ts" in processor.model_input_names

    # ----- vision -----
    def _images(self, sample: Sample) -> dict:
        blocks = sample.media("image")
        if not blocks:
            return {}
        size = {"shortest_edge": self.vision.min_pixels, "longest_edge": self.vision.max_pixels}
        try:
            images = [load_image(b["image"]) for b in blocks]
        except Exception as err:
            raise DataError(f"{sample.source}: cannot read image ({_first_line(err)}).") from err
        out = self.processor.image_processor(images=images, size=size, return_tensors="pt")
        return {"pixel_values": out["pixel_values"], "image_grid_thw": out["image_grid_thw"]}

    def _videos(self, sample: Sample) -> dict:
        blocks = sample.media("video")
        if not blocks:
            return {}
        pixel_values, grids, seconds = [], [], []
        for block in blocks:
            try:
                video = load_video(block["video"], self.vision.video)
            except Exception as err:
                raise DataError(f"{sample.source}: cannot read video {block['video']} ({_first_line(err)}).") from err
            size = {
                "shortest_edge": self.vision.video_min_pixels,
                "longest_edge": self.vision.video_frame_max_pixels(len(video.indices)),
            }
            out = self.processor.video_processor(
                videos=[video.frames],
                size=size,
                do_sample_frames=False,  # already sampled, with the real fps
                cap_pixels_per_frame=False,  # the budget is applied in `size` above
                return_tensors="pt",
            )
            pixel_values.append(out["pixel_values_videos"])
            grids.append(out["video_grid_thw"])
            seconds.append(self.temporal_patch_size / video.sampled_fps)
        result = {"pixel_values_videos": torch.cat(pixel_values), "video_grid_thw": torch.cat(grids)}
        if self.uses_time:
            result["second_per_grid_ts"] = seconds
        return result

    # ----- text -----
    def _render(self, messages: list[dict], generation_prompt: bool) -> str:
        return self.processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)

    def segments(self, sample: Sample, generation_prompt: bool = False) -> list[tuple[str, bool]]:
        """The rendered conversation as (text, trained) pieces, rendering one assistant turn at a time."""
        messages = sample.messages
        assistant_turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
        trained_turns = set(assistant_turns[-1:] if self.label_mode == "last_assistant" else assistant_turns)
        pieces, done = [], ""
        for i in assistant_turns:
            prefix, full = self._render(messages[:i], True), self._render(messages[: i + 1], False)
            if not (prefix.startswith(done) and full.startswith(prefix)):
                raise DataError(
                    f"{sample.source}: turn {i} cannot be rendered as a continuation of the turns before it "
                    "(a conversation must start with a system or user turn, and the chat template must not "
                    "rewrite earlier turns)."
                )
            reply = full[len(prefix) :]
            body = reply.rstrip()  # the newline after the end-of-turn token belongs to the next prompt
            if not body or body == self.tokenizer.eos_token:
                raise DataError(f"{sample.source}: assistant turn {i} is empty.")
            pieces += [(prefix[len(done) :], False), (body, i in trained_turns), (reply[len(body) :], False)]
            done = full
        tail = self._render(messages, generation_prompt)
        pieces.append((tail[len(done) :], False))
        if self.label_mode == "all":
            pieces = [(text, True) for text, _ in pieces]
        return [(text, trained) for text, trained in pieces if text]

    def encode(self, sample: Sample, generation_prompt: bool = False) -> EncodedSample:
        """Tokens, labels and vision tensors for one sample. With `generation_prompt`, the sample must end
        before the reply to generate (used by evaluation)."""
        vision = {**self._images(sample), **self._videos(sample)}
        counts = {
            self.image_pad_id: iter((vision.get("image_grid_thw", torch.empty(0, 3)).prod(-1) // self.merge_length).tolist()),
            self.video_pad_id: iter((vision.get("video_grid_thw", torch.empty(0, 3)).prod(-1) // self.merge_length).tolist()),
        }
        input_ids, labels = [], []
        for text, trained in self.segments(sample, generation_prompt):
            for token in self.tokenizer(text, add_special_tokens=False)["input_ids"]:
                if token in counts:
                    n = next(counts[token], None)
                    if n is None:
                        raise DataError(f"{sample.source}: more vision placeholders in the text than media files.")
                    input_ids += [token] * n
                    labels += [IGNORE_INDEX] * n
                else:
                    input_ids.append(token)
                    labels.append(token if trained else IGNORE_INDEX)
        if any(next(it, None) is not None for it in counts.values()):
            raise DataError(f"{sample.source}: the chat template rendered fewer vision placeholders than media files.")
        if self.max_length is not None and len(input_ids) > self.max_length:
            raise DataError(
                f"{sample.source}: {len(input_ids)} tokens, more than data.max_length={self.max_length}. Nothing "
                "is truncated (cutting vision tokens breaks the model inputs): raise data.max_length, lower "
                "model.max_pixels / model.video_max_pixels / model.video_fps, or remove the sample."
            )
        type_ids = [1 if t == self.image_pad_id else 2 if t == self.video_pad_id else 0 for t in input_ids]
        return EncodedSample(input_ids, labels, type_ids, **vision)


def _first_line(err: Exception) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__
