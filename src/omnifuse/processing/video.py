"""Video sources -> the frames a model sees, with their times.

The sampling contract, one for every model and file:

- Sample times are ``start + k / fps`` for k = 0, 1, ... while before the end: ``end`` if given,
  else the end of the video (the last frame's time plus its duration).
- The frame taken at a sample time is the frame on screen then: the last frame whose presentation
  time is at or before it (the first frame for times before it). Variable frame rate files follow
  the same rule, so a frame shown for two seconds can be taken twice at 1 fps.
- A file whose frames end well before the duration its header gives (cut short, damaged) is an
  error, not a shorter video.
- More than ``max_frames`` sample times is an error naming the count (lower ``fps`` or raise
  ``max_frames``); nothing is dropped silently. The count is checked against the container's
  duration before decoding when it has one, and while decoding otherwise.

The same file and settings always give the same frames: decoding runs in presentation order with
PyAV (FFmpeg) on one thread, and frames are converted to RGB there.

Frames already in memory, ``(frames, frame_rate)`` with frame ``i`` on screen from ``i /
frame_rate`` seconds, follow the same contract: they give the frame indices a file of those frames
at that constant rate gives.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from omnifuse.errors import VideoError
from omnifuse.processing.media import open_av_stream, read_media_bytes

__all__ = ["ProcessedVideo", "VideoError", "VideoFrames", "VideoProcessor", "VideoSource", "load_video", "sample_times"]

VideoSource = str | Path | bytes | tuple[Sequence[Image.Image], float]  # the tuple: (frames, frame rate)


@dataclass(frozen=True)
class VideoFrames:
    frames: tuple[Image.Image, ...]  # RGB, one per sample time
    timestamps: tuple[float, ...]  # the sample times, seconds from the start of the video
    frame_indices: tuple[int, ...]  # which decoded frame (0-based, presentation order) each one is
    duration: float  # of the video, seconds
    fps: float  # the sampling rate asked for


def sample_times(start: float, end: float, fps: float) -> list[float]:
    """``start + k / fps`` for every k with the time before ``end``."""
    n = max(0, math.ceil((end - start) * fps - 1e-9))
    return [start + k / fps for k in range(n)]


def _describe(source: VideoSource) -> str:
    if isinstance(source, (str, Path)):
        return f"video file {str(source)!r}"
    if isinstance(source, (bytes, bytearray)):
        return f"video data ({len(source)} bytes)"
    return "video frames in memory" if isinstance(source, tuple) else "video source"


def _too_many(name: str, n: int, fps: float, max_frames: int) -> VideoError:
    return VideoError(f"{name} gives {n} frames at {fps:g} fps, more than max_frames {max_frames}; "
                      "lower the fps or raise max_frames")


def load_video(source: VideoSource, fps: float = 1.0, max_frames: int = 64, start: float = 0.0,
               end: float | None = None, max_pixels: int = 64_000_000) -> VideoFrames:
    """The frames of ``source`` (a path, a file's bytes, or ``(frames, frame_rate)``) at ``fps`` between ``start`` and ``end``
    seconds, by the sampling contract above. Raises ``VideoError`` naming the source for a missing
    or empty file, one without a video stream or that FFmpeg cannot decode, no frames, a start
    past the end, frames larger than ``max_pixels``, or more than ``max_frames`` frames."""
    import av

    name = _describe(source)
    if not (fps > 0 and math.isfinite(fps)):
        raise VideoError(f"fps must be a positive number, got {fps}")
    if max_frames < 1:
        raise VideoError(f"max_frames must be at least 1, got {max_frames}")
    if start < 0 or (end is not None and end <= start):
        raise VideoError(f"the video range must have 0 <= start < end, got start {start} and end {end}")
    if isinstance(source, tuple):
        return _sample_frames(source, name, fps, max_frames, start, end, max_pixels)
    data = read_media_bytes(source, name, VideoError, "a video source is a path, bytes or (frames, frame rate)")
    container, stream = open_av_stream(data, "video", name, VideoError)
    with container:
        stream.thread_type = "SLICE"  # no frame threading: the same order and frames on every run
        w, h = stream.codec_context.width, stream.codec_context.height
        if w and h and w * h > max_pixels:
            raise VideoError(f"{name} has {w} x {h} frames, more than the {max_pixels:,} pixels allowed")
        known = float(container.duration) / av.time_base if container.duration else None
        if known is not None:
            n = len(sample_times(start, min(end, known) if end is not None else known, fps))
            if n > max_frames:
                raise _too_many(name, n, fps, max_frames)
        step = 1.0 / float(stream.average_rate) if stream.average_rate else 0.0
        picked: list[tuple[float, int, Image.Image]] = []
        k = 0  # the next sample time is start + k / fps

        def take(index: int, frame) -> None:
            nonlocal k
            image = picked[-1][2] if picked and picked[-1][1] == index else frame.to_image().convert("RGB")
            picked.append((start + k / fps, index, image))
            k += 1
            if len(picked) > max_frames:
                raise _too_many(name, len(picked), fps, max_frames)

        current = None  # (index, frame) of the frame on screen
        index, last_end = -1, 0.0
        try:
            for frame in container.decode(stream):
                if frame.time is None:
                    continue
                index += 1
                t = float(frame.time)
                while start + k / fps < t and (end is None or start + k / fps < end):
                    take(*(current or (index, frame)))  # before the first frame: the first frame
                current = (index, frame)
                last_end = t + (float(frame.duration * frame.time_base) if frame.duration else step)
                if end is not None and start + k / fps >= end:
                    break
        except av.FFmpegError as e:
            raise VideoError(f"cannot decode {name}: {e}") from None
        if current is None:
            raise VideoError(f"{name} has no video frames")
        wanted = known if end is None else min(end, known) if known is not None else None
        if wanted is not None and last_end + 2 * max(step, 0.04) < wanted:
            raise VideoError(f"{name} is cut short or damaged: its header says {known:.2f} s but its frames "
                             f"end at {last_end:.2f} s")
        stop = last_end if end is None else min(end, last_end)
        if start >= stop:
            raise VideoError(f"{name} is {last_end:.2f} s long; start {start:g} s is past its end")
        while start + k / fps < stop:
            take(*current)
    return VideoFrames(frames=tuple(f for _, _, f in picked), timestamps=tuple(round(s, 6) for s, _, _ in picked),
                       frame_indices=tuple(i for _, i, _ in picked), duration=last_end, fps=fps)


def _sample_frames(source: tuple, name: str, fps: float, max_frames: int, start: float, end: float | None,
                   max_pixels: int) -> VideoFrames:
    """The sampling contract over frames in memory shown at a constant rate."""
    if len(source) != 2:
        raise VideoError(f"video frames in memory are (frames, frame_rate), got a tuple of {len(source)}")
    frames, rate = source
    if not isinstance(frames, Sequence) or not all(isinstance(f, Image.Image) for f in frames):
        raise VideoError(f"{name}: the frames must be a sequence of PIL images")
    if not frames:
        raise VideoError(f"{name} has no video frames")
    if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not (rate > 0 and math.isfinite(rate)):
        raise VideoError(f"{name}: the frame rate must be a positive number, got {rate!r}")
    if len({f.size for f in frames}) != 1:
        raise VideoError(f"{name}: the frames differ in size: {sorted({f.size for f in frames})}")
    w, h = frames[0].size
    if w * h > max_pixels:
        raise VideoError(f"{name} has {w} x {h} frames, more than the {max_pixels:,} pixels allowed")
    duration = len(frames) / rate
    stop = duration if end is None else min(end, duration)
    if start >= stop:
        raise VideoError(f"{name} is {duration:.2f} s long; start {start:g} s is past its end")
    times = sample_times(start, stop, fps)
    if len(times) > max_frames:
        raise _too_many(name, len(times), fps, max_frames)
    indices = [min(len(frames) - 1, math.floor(t * rate + 1e-9)) for t in times]  # the frame on screen
    rgb = {i: frames[i].convert("RGB") for i in sorted(set(indices))}
    return VideoFrames(frames=tuple(rgb[i] for i in indices), timestamps=tuple(round(t, 6) for t in times),
                       frame_indices=tuple(indices), duration=duration, fps=fps)


# ---------------------------------------------------------------------------------------------
# Processing


@dataclass(frozen=True)
class ProcessedVideo:
    """A clip as a media item (``omnifuse.processing.media.MediaItem``)."""

    inputs: dict  # pixel_values (groups, temporal_patch, 3, H, W), group_ids (groups,)
    num_tokens: int
    timestamps: tuple[float, ...]  # of the frames taken
    frame_indices: tuple[int, ...]
    duration: float
    fps: float
    size: tuple[int, int]  # (width, height) of the frames
    attendable: object = None
    features: object = None
    keep: object = None
    modality: str = "video"


class VideoProcessor:
    """Turns video sources into ``ProcessedVideo`` items: frames by the sampling contract, each
    through ``image_processor`` (one crop per frame), grouped ``temporal_patch`` at a time (the
    last group repeats its last frame when the count is odd, as Qwen2.5-VL pads)."""

    def __init__(self, config, image_processor, frame_tokens: int | None = None) -> None:
        """``frame_tokens``: tokens of one frame group after the encoder (default: the image
        processor's tokens of one crop)."""
        if image_processor.config.mode != "fixed":
            raise VideoError("video frames need image.mode fixed (one crop per frame)")
        self.config = config
        self.image_processor = image_processor
        self.frame_tokens = frame_tokens

    def num_frames(self, seconds: float, fps: float | None = None) -> int:
        return len(sample_times(0.0, seconds, fps or self.config.fps))

    def num_tokens(self, seconds: float, width: int, height: int, fps: float | None = None) -> int:
        """Tokens of a ``seconds``-long ``width x height`` video at ``fps`` (the config's by default)."""
        frames = self.num_frames(seconds, fps)
        if frames > self.config.max_frames:
            raise VideoError(f"a {seconds:g} s video gives {frames} frames at {fps or self.config.fps:g} fps, "
                             f"more than max_frames {self.config.max_frames}")
        groups = -(-frames // self.config.temporal_patch)
        return groups * (self.frame_tokens or self.image_processor.num_tokens(width, height))

    def __call__(self, source: VideoSource, fps: float | None = None, max_frames: int | None = None) -> ProcessedVideo:
        import torch

        fps = fps or self.config.fps
        max_frames = min(max_frames or self.config.max_frames, self.config.max_frames)
        clip = load_video(source, fps=fps, max_frames=max_frames, max_pixels=self.image_processor.config.max_pixels)
        done: dict[int, torch.Tensor] = {}  # a frame taken at several times is processed once
        for index, frame in zip(clip.frame_indices, clip.frames):
            if index not in done:
                done[index] = self.image_processor(frame).pixel_values
        pixels = torch.cat([done[index] for index in clip.frame_indices])  # (F, 3, H, W)
        p = self.config.temporal_patch
        if pixels.shape[0] % p:
            pixels = torch.cat([pixels, pixels[-1:].expand(p - pixels.shape[0] % p, *pixels.shape[1:])])
        groups = pixels.shape[0] // p
        width, height = clip.frames[0].size
        tokens = groups * (self.frame_tokens or self.image_processor.num_tokens(width, height))  # = num_tokens(...)
        return ProcessedVideo(inputs={"pixel_values": pixels.view(groups, p, *pixels.shape[1:]),
                                      "group_ids": torch.arange(groups)},
                              num_tokens=tokens, timestamps=clip.timestamps, frame_indices=clip.frame_indices,
                              duration=clip.duration, fps=fps, size=(width, height))
