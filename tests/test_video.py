"""Video decoding and the frame-sampling contract (processing/video.py) on videos generated here:
constant frame rates of 10, 25 and 30000/1001 fps, a variable frame rate file, MP4 and WebM."""

from __future__ import annotations

from fractions import Fraction

import numpy as np
import pytest

from omnifuse.errors import VideoError
from omnifuse.processing.video import load_video, sample_times


def colour(i: int) -> np.ndarray:
    """Frame i's picture: a flat colour that survives lossy coding (steps of 40 per channel)."""
    return np.full((32, 48, 3), ((40 * i) % 240, (40 * (i // 6)) % 240, 128), np.uint8)


def make_video(path, times, codec: str = "mpeg4", time_base: Fraction = Fraction(1, 1000),
               rate: Fraction | None = None, size: tuple[int, int] = (48, 32)) -> None:
    """Frames 0..n-1 shown from ``times[i]`` seconds (Fractions), encoded with PyAV."""
    import av

    with av.open(str(path), "w") as out:
        stream = out.add_stream(codec, rate=rate or 25)
        stream.width, stream.height, stream.pix_fmt = size[0], size[1], "yuv420p"
        stream.codec_context.time_base = time_base
        stream.time_base = time_base
        for i, t in enumerate(times):
            picture = colour(i)
            if size != (48, 32):  # other sizes get some structure too: a moving bright square
                picture = np.resize(picture, (size[1], size[0], 3))
                x = (4 * i) % max(1, size[0] - 12)
                picture[4:16, x:x + 12] = 250
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(picture), format="rgb24")
            frame.pts = int(t / time_base)
            frame.time_base = time_base
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode(None):
            out.mux(packet)


def expected_indices(times, taken) -> list[int]:
    """The frame on screen at each taken time: the last one that starts at or before it."""
    return [max([i for i, t in enumerate(times) if t <= s] or [0]) for s in taken]


@pytest.mark.parametrize("rate", [Fraction(10), Fraction(25), Fraction(30000, 1001)], ids=str)
@pytest.mark.parametrize("fps", [1.0, 4.0, 0.5])
def test_constant_frame_rates_follow_the_contract(tmp_path, rate, fps):
    n = int(3 * rate)  # three seconds
    times = [Fraction(i) / rate for i in range(n)]
    path = tmp_path / "cfr.mp4"
    make_video(path, times, time_base=1 / rate, rate=rate)
    clip = load_video(path, fps=fps)
    taken = sample_times(0.0, float(n / rate), fps)
    assert clip.timestamps == tuple(round(s, 6) for s in taken)
    assert list(clip.frame_indices) == expected_indices(times, [Fraction(s).limit_denominator(10**6) for s in taken])
    assert abs(clip.duration - float(n / rate)) < 1e-6
    for i, frame in zip(clip.frame_indices, clip.frames):  # the pictures are those frames
        assert frame.size == (48, 32) and frame.mode == "RGB"
        assert np.abs(np.asarray(frame).astype(int)[8:24, 8:40] - colour(i)[8:24, 8:40]).mean() < 12


def test_variable_frame_rate_takes_the_frame_on_screen(tmp_path):
    times = [Fraction(0), Fraction(1, 10), Fraction(15, 100), Fraction(1), Fraction(12, 10), Fraction(5, 2)]
    path = tmp_path / "vfr.mp4"
    make_video(path, times)
    clip = load_video(path, fps=2.0, end=2.6)
    assert clip.timestamps == (0.0, 0.5, 1.0, 1.5, 2.0, 2.5)
    assert clip.frame_indices == (0, 2, 3, 4, 4, 5)  # frame 4 is on screen from 1.2 s to 2.5 s
    later = load_video(path, fps=2.0, start=1.1, end=2.6)
    assert later.timestamps == (1.1, 1.6, 2.1) and later.frame_indices == (3, 4, 4)


def test_the_same_file_and_settings_give_the_same_frames(tmp_path):
    path = tmp_path / "clip.webm"
    make_video(path, [Fraction(i, 10) for i in range(25)], codec="libvpx", time_base=Fraction(1, 10), rate=Fraction(10))
    a, b = load_video(path, fps=3.0), load_video(path.read_bytes(), fps=3.0)
    assert a.frame_indices == b.frame_indices and a.timestamps == b.timestamps
    assert all(x.tobytes() == y.tobytes() for x, y in zip(a.frames, b.frames))
    assert len(a.frames) == len(sample_times(0.0, 2.5, 3.0)) == 8


def test_too_many_frames_is_refused_with_the_count(tmp_path):
    path = tmp_path / "long.mp4"
    make_video(path, [Fraction(i, 10) for i in range(40)], time_base=Fraction(1, 10), rate=Fraction(10))
    with pytest.raises(VideoError, match="gives 16 frames at 4 fps, more than max_frames 10"):
        load_video(path, fps=4.0, max_frames=10)
    assert len(load_video(path, fps=4.0, max_frames=16).frames) == 16


def test_bad_video_is_named(tmp_path):
    import soundfile as sf

    wav = tmp_path / "sound.wav"
    sf.write(wav, np.zeros(1600, np.float32), 16000)
    short = tmp_path / "short.mp4"
    make_video(short, [Fraction(i, 10) for i in range(10)], time_base=Fraction(1, 10), rate=Fraction(10))
    cases = [
        (dict(source=tmp_path / "absent.mp4"), "not found"),
        (dict(source=b""), "is empty"),
        (dict(source=[1, 2]), r"a video source is a path, bytes or \(frames, frame rate\), got list"),
        (dict(source=7), r"a video source is a path, bytes or \(frames, frame rate\), got int"),
        (dict(source=b"\x00\x00\x00\x18ftypmp42" + b"garbage" * 20), "cannot decode"),
        (dict(source=wav), "has no video stream .streams: audio."),
        (dict(source=short, start=2.0), "1.00 s long; start 2 s is past its end"),
        (dict(source=short, fps=0), "fps must be a positive number"),
        (dict(source=short, start=1.0, end=0.5), "0 <= start < end"),
        (dict(source=short, max_pixels=100), "48 x 32 frames, more than the 100 pixels allowed"),
        (dict(source=short.read_bytes()[: short.stat().st_size // 2]), "video data .\\d+ bytes. has no video"),
    ]
    for kwargs, words in cases:
        with pytest.raises(VideoError, match=words):
            load_video(**kwargs)


def test_a_file_cut_short_is_refused_not_shortened(tmp_path):
    path = tmp_path / "clip.webm"
    make_video(path, [Fraction(i, 10) for i in range(25)], codec="libvpx", time_base=Fraction(1, 10), rate=Fraction(10))
    data = path.read_bytes()
    with pytest.raises(VideoError, match=r"cut short or damaged: its header says 2.50 s but its frames end at"):
        load_video(data[: int(len(data) * 0.6)], fps=10)
    assert len(load_video(data, fps=10).frames) == 25


def test_an_unsupported_codec_is_named(tmp_path):
    path = tmp_path / "clip.mkv"
    make_video(path, [Fraction(i, 10) for i in range(10)], time_base=Fraction(1, 10), rate=Fraction(10))
    data = path.read_bytes()
    assert data.count(b"V_MPEG4/ISO/ASP") == 1
    unknown = data.replace(b"V_MPEG4/ISO/ASP", b"V_NOSUCH/CODEC/")  # a codec id no FFmpeg decoder has
    with pytest.raises(VideoError, match="its video codec is not supported"):
        load_video(unknown)
    assert len(load_video(data, fps=10).frames) == 10


def frame_pictures(n: int) -> list:
    from PIL import Image

    return [Image.fromarray(colour(i)) for i in range(n)]


@pytest.mark.parametrize("rate, fps", [(10, 1.0), (10, 4.0), (2, 2.0), (2, 3.0), (25, 0.5)])
def test_frames_in_memory_follow_the_contract_of_a_file(tmp_path, rate, fps):
    frames = frame_pictures(3 * rate)
    path = tmp_path / "same.mp4"
    make_video(path, [Fraction(i, rate) for i in range(len(frames))], time_base=Fraction(1, rate), rate=Fraction(rate))
    from_file, in_memory = load_video(path, fps=fps), load_video((frames, rate), fps=fps)
    assert in_memory.frame_indices == from_file.frame_indices
    assert in_memory.timestamps == from_file.timestamps and in_memory.duration == pytest.approx(from_file.duration)
    assert [f.tobytes() for f in in_memory.frames] == [frames[i].tobytes() for i in in_memory.frame_indices]


def test_bad_frames_in_memory_are_named():
    from PIL import Image

    frames = frame_pictures(4)
    cases = [
        (([], 2.0), "has no video frames"),
        ((frames, 0), "frame rate must be a positive number, got 0"),
        ((frames, float("nan")), "frame rate must be a positive number"),
        ((frames + [Image.new("RGB", (8, 8))], 2.0), "the frames differ in size"),
        (([np.zeros((4, 4, 3))], 2.0), "a sequence of PIL images"),
        ((frames,), r"\(frames, frame_rate\), got a tuple of 1"),
    ]
    for source, words in cases:
        with pytest.raises(VideoError, match=words):
            load_video(source)
    with pytest.raises(VideoError, match="gives 8 frames at 4 fps, more than max_frames 4"):
        load_video((frames, 2.0), fps=4.0, max_frames=4)
