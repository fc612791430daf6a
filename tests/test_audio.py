"""Audio loading (soundfile, PyAV, soxr) and Whisper log-mel features against transformers'
``WhisperFeatureExtractor``. Every clip is synthesised here."""

from __future__ import annotations

import io

import numpy as np
import pytest
import soundfile as sf

from omnifuse.errors import AudioError
from omnifuse.processing.audio import chunk_features, load_audio, log_mel_spectrogram, valid_frames

RATE = 16000


def tone(seconds: float, hz: float = 440.0, rate: int = RATE, channels: int = 1, seed: int = 0) -> np.ndarray:
    """A tone with a little noise (so no two frames are equal): (samples,) or (samples, channels)."""
    t = np.arange(round(seconds * rate)) / rate
    rng = np.random.default_rng(seed)
    x = 0.5 * np.sin(2 * np.pi * hz * t) + 0.01 * rng.standard_normal(t.shape)
    if channels > 1:
        x = np.stack([x * (0.5 + 0.5 * c / channels) for c in range(channels)], axis=1)
    return x.astype(np.float32)


def encode_av(path, samples: np.ndarray, rate: int, codec: str, container_format: str | None = None) -> None:
    """Encode mono float samples with PyAV (FFmpeg), as a user's MP3 / M4A would be made."""
    import av

    with av.open(str(path), "w", format=container_format) as out:
        stream = out.add_stream(codec, rate=rate, layout="mono")
        frame_size = stream.codec_context.frame_size or 1024
        fmt = stream.codec_context.format.name
        pcm = samples.reshape(1, -1).astype(np.float32)
        for start in range(0, pcm.shape[1], frame_size):
            piece = pcm[:, start:start + frame_size]
            if piece.shape[1] < frame_size:
                piece = np.pad(piece, ((0, 0), (0, frame_size - piece.shape[1])))
            frame = av.AudioFrame.from_ndarray(piece, format="fltp", layout="mono")
            frame.sample_rate = rate
            if fmt not in ("fltp", "flt"):
                frame = av.AudioResampler(format=fmt, layout="mono", rate=rate).resample(frame)[0]
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode(None):
            out.mux(packet)


def dominant_hz(x: np.ndarray, rate: int) -> float:
    spectrum = np.abs(np.fft.rfft(x * np.hanning(len(x))))
    return float(np.fft.rfftfreq(len(x), 1 / rate)[spectrum.argmax()])


# --- features -------------------------------------------------------------------------------


@pytest.mark.parametrize("n_mels", [80, 128])
@pytest.mark.parametrize("seconds", [0.37, 1.0, 4.25])
def test_log_mel_equals_whisper_feature_extractor(n_mels, seconds):
    from transformers import WhisperFeatureExtractor

    x = tone(seconds, hz=300 + 700 * seconds, seed=n_mels)
    reference = WhisperFeatureExtractor(feature_size=n_mels)
    want = reference(x, sampling_rate=RATE, return_tensors="np", return_attention_mask=True)
    feats, frames = chunk_features(x, reference.n_samples, n_mels=n_mels)
    assert feats.shape == (1, n_mels, 3000)
    np.testing.assert_allclose(feats[0].numpy(), want["input_features"][0], atol=1e-4, rtol=0)
    assert frames == [int(want["attention_mask"][0].sum())] == [valid_frames(len(x), 160)]


def test_long_audio_is_cut_into_whisper_chunks():
    from transformers import WhisperFeatureExtractor

    reference = WhisperFeatureExtractor()
    x = tone(31.5, hz=523.0)
    feats, frames = chunk_features(x, reference.n_samples)
    assert feats.shape == (2, 80, 3000) and frames == [3000, 150]
    for i, piece in enumerate((x[:reference.n_samples], x[reference.n_samples:])):
        want = reference(piece, sampling_rate=RATE, return_tensors="np")["input_features"][0]
        np.testing.assert_allclose(feats[i].numpy(), want, atol=1e-4, rtol=0)


def test_batched_clips_are_clamped_each_against_its_own_maximum():
    import torch

    loud, quiet = tone(1.0), 0.001 * tone(1.0, seed=1)
    both = log_mel_spectrogram(torch.from_numpy(np.stack([loud, quiet])))
    torch.testing.assert_close(both[1], log_mel_spectrogram(torch.from_numpy(quiet)))


# --- loading --------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt, subtype", [("WAV", "PCM_16"), ("FLAC", "PCM_16"), ("OGG", "VORBIS")])
def test_soundfile_formats_load_as_mono_at_the_model_rate(tmp_path, fmt, subtype):
    import soxr

    stereo = tone(1.5, hz=660.0, rate=44100, channels=2)
    path = tmp_path / f"clip.{fmt.lower()}"
    sf.write(path, stereo, 44100, format=fmt, subtype=subtype)
    x = load_audio(path, RATE)
    assert x.dtype == np.float32 and x.ndim == 1
    assert abs(len(x) - 1.5 * RATE) <= 2
    assert abs(dominant_hz(x, RATE) - 660.0) < 2.0
    if fmt != "OGG":  # lossless: exactly the stored samples, averaged, then resampled by soxr
        stored, _ = sf.read(path, dtype="float32", always_2d=True)
        np.testing.assert_allclose(x, soxr.resample(stored.mean(axis=1), 44100, RATE), atol=1e-6)
    assert np.array_equal(load_audio(path.read_bytes(), RATE), x)  # bytes give the same samples


@pytest.mark.parametrize("suffix, codec, container", [(".mp3", "mp3", None), (".m4a", "aac", "mp4"),
                                                      (".opus", "libopus", "ogg")])
def test_compressed_formats_load_through_pyav(tmp_path, suffix, codec, container):
    import av

    if codec not in av.codecs_available:
        pytest.skip(f"this FFmpeg build has no {codec} encoder to make the test file")
    path = tmp_path / f"clip{suffix}"
    encode_av(path, tone(2.0, hz=880.0, rate=48000), 48000, codec, container)
    x = load_audio(path, RATE)
    assert abs(len(x) / RATE - 2.0) < 0.1  # encoder delay and padding are a few frames
    assert abs(dominant_hz(x, RATE) - 880.0) < 3.0


def test_arrays_are_taken_as_samples_by_channels_and_resampled():
    stereo = tone(1.0, rate=8000, channels=2)
    x = load_audio((stereo, 8000), RATE)
    assert len(x) == RATE
    pcm = (tone(1.0) * 32767).astype(np.int16)
    np.testing.assert_allclose(load_audio((pcm, RATE), RATE), pcm / 32768.0, atol=1e-7)


def test_a_video_without_sound_has_no_audio_stream(tmp_path):
    import av

    path = tmp_path / "silent.mp4"
    with av.open(str(path), "w") as out:
        stream = out.add_stream("mpeg4", rate=10)
        stream.width, stream.height, stream.pix_fmt = 32, 32, "yuv420p"
        for i in range(5):
            frame = av.VideoFrame.from_ndarray(np.full((32, 32, 3), 40 * i, np.uint8), format="rgb24")
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode(None):
            out.mux(packet)
    with pytest.raises(AudioError, match="silent.mp4' has no audio stream .streams: video."):
        load_audio(path, RATE)


def wav_bytes(seconds: float, rate: int = RATE) -> bytes:
    buffer = io.BytesIO()
    sf.write(buffer, tone(seconds, rate=rate), rate, format="WAV")
    return buffer.getvalue()


@pytest.mark.parametrize("source, words", [
    ("missing.wav", "not found"),
    (b"", "is empty"),
    (b"not audio at all" * 10, "cannot decode audio data .160 bytes."),
    ((np.zeros(0, np.float32), RATE), "has no audio samples"),
    ((np.zeros(10, np.float32), 0), "sample rate 0"),
    ((np.zeros((2, 3, 4), np.float32), RATE), "shape .2, 3, 4."),
    ((np.array([0.0, np.nan], np.float32), RATE), "non-finite"),
    ((np.zeros(10), RATE, 1), r"\(samples, sampling rate\)"),
    ([0.0, 0.1], r"a path, bytes or \(samples, rate\), got list"),
])
def test_bad_audio_is_named(tmp_path, source, words):
    if source == "missing.wav":
        source = tmp_path / source
    with pytest.raises(AudioError, match=words):
        load_audio(source, RATE)


def test_an_unsupported_codec_is_named():
    data = bytearray(wav_bytes(1.0))
    fmt = data.index(b"fmt ")
    data[fmt + 8:fmt + 10] = (0x7777).to_bytes(2, "little")  # a WAV format tag no decoder knows
    with pytest.raises(AudioError, match="its audio codec is not supported"):
        load_audio(bytes(data), RATE)


def test_a_truncated_file_is_refused(tmp_path):
    with pytest.raises(AudioError, match="cannot decode"):
        load_audio(wav_bytes(1.0)[:30], RATE)  # the header cut short


def test_audio_longer_than_allowed_is_refused_before_it_is_decoded(tmp_path):
    with pytest.raises(AudioError, match=r"audio data \(\d+ bytes\) is 3.0 s long, more than the 2 s allowed"):
        load_audio(wav_bytes(3.0), RATE, max_seconds=2)
    path = tmp_path / "long.m4a"
    encode_av(path, tone(3.0, rate=48000), 48000, "aac", "mp4")
    with pytest.raises(AudioError, match="more than the 2 s allowed"):
        load_audio(path, RATE, max_seconds=2)
    assert len(load_audio(wav_bytes(1.0), RATE, max_seconds=2)) == RATE
