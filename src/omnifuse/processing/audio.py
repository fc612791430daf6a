"""Audio sources -> mono waveforms at the model's rate -> Whisper log-mel features.

Loading: ``soundfile`` (libsndfile: WAV, FLAC, OGG/Vorbis, ...) first, then PyAV (FFmpeg: MP3,
M4A/AAC, Opus, the audio track of a video file, ...) for anything libsndfile does not read. The
channels are averaged to mono and the rate is converted with ``soxr``. A file longer than
``max_seconds`` is refused by its header when it has one, and while decoding when it has not, so a
huge file is never decoded whole.

Features: ``log_mel_spectrogram`` computes what transformers' ``WhisperFeatureExtractor`` computes
(a Hann window of ``n_fft`` samples every ``hop_length``, the power spectrum without its last frame,
Slaney-normalised mel filters from 0 to 8 kHz, log10 floored at 1e-10, values below the maximum
minus 8 raised to it, then ``(x + 4) / 4``), with ``torch.stft``. ``chunk_features`` cuts a waveform
into chunks of ``chunk_samples`` and zero-pads the last one, as Whisper pads every clip to 30 s, and
says how many frames of each chunk hold audio.
"""

from __future__ import annotations

import io
import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from omnifuse.errors import AudioError
from omnifuse.processing.media import open_av_stream, read_media_bytes

if TYPE_CHECKING:
    from omnifuse.config import AudioConfig

__all__ = [
    "AudioError",
    "AudioProcessor",
    "AudioSource",
    "ProcessedAudio",
    "chunk_features",
    "load_audio",
    "log_mel_spectrogram",
    "mel_filter_bank",
    "valid_frames",
]

# A path, the bytes of a file, or (samples, sampling rate): 1-D samples, or 2-D (samples, channels).
AudioSource = str | Path | bytes | tuple[np.ndarray, int]

_MAX_CHANNELS = 64


def _describe(source: AudioSource) -> str:
    if isinstance(source, (str, Path)):
        return f"audio file {str(source)!r}"
    if isinstance(source, (bytes, bytearray)):
        return f"audio data ({len(source)} bytes)"
    return "audio array"


def _too_long(name: str, seconds: float, max_seconds: float) -> AudioError:
    return AudioError(f"{name} is {seconds:.1f} s long, more than the {max_seconds:g} s allowed "
                      "(audio.max_seconds)")


def _read_soundfile(data: bytes, name: str, max_seconds: float | None) -> tuple[np.ndarray, int] | None:
    """(samples (S, C) float32, rate), or None when libsndfile does not read this format."""
    import soundfile as sf

    try:
        with sf.SoundFile(io.BytesIO(data)) as f:
            if f.samplerate <= 0:
                raise AudioError(f"{name} has sample rate {f.samplerate}")
            if max_seconds is not None and f.frames > max_seconds * f.samplerate:
                raise _too_long(name, f.frames / f.samplerate, max_seconds)
            return f.read(dtype="float32", always_2d=True), f.samplerate
    except sf.LibsndfileError:
        return None  # not a format libsndfile knows, or damaged: FFmpeg has its say


def _read_av(data: bytes, name: str, max_seconds: float | None) -> tuple[np.ndarray, int]:
    import av

    container, stream = open_av_stream(data, "audio", name, AudioError)
    with container:
        rate = stream.codec_context.sample_rate
        if not rate or rate <= 0:
            raise AudioError(f"{name} has sample rate {rate}")
        resampler = av.AudioResampler(format="fltp")  # planar float32, the stream's own layout and rate
        parts: list[np.ndarray] = []
        total = 0
        try:
            for frame in container.decode(stream):
                for out in resampler.resample(frame):
                    parts.append(out.to_ndarray().reshape(len(out.layout.channels), -1))  # (C, n)
                    total += parts[-1].shape[1]
                if max_seconds is not None and total > max_seconds * rate:
                    raise _too_long(name, total / rate, max_seconds)
            for out in resampler.resample(None):
                parts.append(out.to_ndarray().reshape(len(out.layout.channels), -1))
        except av.FFmpegError as e:
            raise AudioError(f"cannot decode {name}: {e}") from None
    if not parts:
        raise AudioError(f"{name} has no audio samples")
    return np.concatenate(parts, axis=1).T, rate  # (S, C)


def _as_samples(array: np.ndarray, rate: int, name: str) -> tuple[np.ndarray, int]:
    x = np.asarray(array)
    if x.ndim == 1:
        x = x[:, None]
    if x.ndim != 2 or x.shape[1] > _MAX_CHANNELS:
        raise AudioError(f"{name} must be 1-D samples or 2-D (samples, channels), got shape {tuple(x.shape)}")
    if not (np.issubdtype(x.dtype, np.floating) or np.issubdtype(x.dtype, np.integer)):
        raise AudioError(f"{name} must hold numbers, got dtype {x.dtype}")
    if np.issubdtype(x.dtype, np.integer):  # PCM integers to [-1, 1), as soundfile reads them
        x = x.astype(np.float32) / float(-np.iinfo(x.dtype).min)
    if isinstance(rate, bool) or not isinstance(rate, (int, np.integer)) or rate <= 0:
        raise AudioError(f"{name} has sample rate {rate!r}; it must be a positive integer")
    return x.astype(np.float32, copy=False), int(rate)


def load_audio(source: AudioSource, sampling_rate: int, max_seconds: float | None = None) -> np.ndarray:
    """A mono float32 waveform at ``sampling_rate``: (samples,).

    ``source``: a path, a file's bytes, or ``(samples, rate)`` with samples 1-D or (samples, channels).
    Raises ``AudioError`` naming the source for a missing or empty file, one without an audio
    stream, one neither libsndfile nor FFmpeg decodes, a bad sample rate, no samples, non-finite
    samples, or more than ``max_seconds``."""
    name = _describe(source)
    if isinstance(source, tuple):
        if len(source) != 2:
            raise AudioError("an audio array is given as (samples, sampling rate)")
        x, rate = _as_samples(*source, name)
        if max_seconds is not None and x.shape[0] > max_seconds * rate:
            raise _too_long(name, x.shape[0] / rate, max_seconds)
    else:
        data = read_media_bytes(source, name, AudioError, "an audio source is a path, bytes or (samples, rate)")
        read = _read_soundfile(data, name, max_seconds) or _read_av(data, name, max_seconds)
        x, rate = read
    if x.shape[0] == 0:
        raise AudioError(f"{name} has no audio samples")
    if not np.isfinite(x).all():
        raise AudioError(f"{name} holds non-finite samples (NaN or infinity)")
    mono = x.mean(axis=1, dtype=np.float32) if x.shape[1] > 1 else x[:, 0]
    if rate != sampling_rate:
        import soxr

        mono = soxr.resample(mono, rate, sampling_rate).astype(np.float32, copy=False)
    return np.ascontiguousarray(mono, dtype=np.float32)


# ---------------------------------------------------------------------------------------------
# Log-mel features (Whisper)


def _hz_to_mel(hz: np.ndarray) -> np.ndarray:
    """Slaney's mel scale: linear below 1 kHz, logarithmic above."""
    hz = np.asarray(hz, dtype=np.float64)
    mel = 3.0 * hz / 200.0
    log = hz >= 1000.0
    return np.where(log, 15.0 + np.log(np.maximum(hz, 1e-12) / 1000.0) * (27.0 / np.log(6.4)), mel)


def _mel_to_hz(mel: np.ndarray) -> np.ndarray:
    mel = np.asarray(mel, dtype=np.float64)
    hz = 200.0 * mel / 3.0
    return np.where(mel >= 15.0, 1000.0 * np.exp((np.log(6.4) / 27.0) * (mel - 15.0)), hz)


@lru_cache(maxsize=8)
def mel_filter_bank(n_fft: int, n_mels: int, sampling_rate: int, f_min: float = 0.0,
                    f_max: float = 8000.0) -> np.ndarray:
    """(n_fft // 2 + 1, n_mels) triangular filters, centres evenly spaced on the Slaney mel scale,
    each divided by its width in Hz / 2 (Slaney area normalisation), in float64."""
    n_freqs = n_fft // 2 + 1
    centres = _mel_to_hz(np.linspace(_hz_to_mel(f_min), _hz_to_mel(f_max), n_mels + 2))
    fft_freqs = np.linspace(0, sampling_rate // 2, n_freqs)
    slopes = centres[None, :] - fft_freqs[:, None]  # (n_freqs, n_mels + 2)
    widths = np.diff(centres)
    rising = -slopes[:, :-2] / widths[:-1]
    falling = slopes[:, 2:] / widths[1:]
    filters = np.maximum(0.0, np.minimum(rising, falling))
    filters *= (2.0 / (centres[2:] - centres[:-2]))[None, :]
    filters.setflags(write=False)
    return filters


def log_mel_spectrogram(waveform: torch.Tensor, n_mels: int = 80, n_fft: int = 400, hop_length: int = 160,
                        sampling_rate: int = 16000) -> torch.Tensor:
    """Whisper's features: (..., samples) float -> (..., n_mels, samples // hop_length). Each
    leading index is one clip, clamped against its own maximum."""
    x = waveform.to(torch.float32)
    lead = x.shape[:-1]
    x = x.reshape(-1, x.shape[-1])
    window = torch.hann_window(n_fft, device=x.device)
    stft = torch.stft(x, n_fft, hop_length, window=window, return_complex=True)  # (B, n_freqs, frames + 1)
    power = stft[..., :-1].abs() ** 2
    filters = torch.tensor(mel_filter_bank(n_fft, n_mels, sampling_rate), dtype=torch.float32, device=x.device)
    mel = filters.T @ power  # (B, n_mels, frames)
    log = torch.clamp(mel, min=1e-10).log10()
    top = log.amax(dim=(1, 2), keepdim=True)
    log = torch.maximum(log, top - 8.0)
    return ((log + 4.0) / 4.0).reshape(*lead, n_mels, -1)


def valid_frames(num_samples: int, hop_length: int) -> int:
    """Feature frames that hold audio for ``num_samples`` samples: Whisper's attention mask, which
    marks every hop-th sample, counts ``ceil(num_samples / hop_length)``."""
    return math.ceil(num_samples / hop_length)


def chunk_features(waveform: np.ndarray, chunk_samples: int, n_mels: int = 80, n_fft: int = 400,
                   hop_length: int = 160, sampling_rate: int = 16000) -> tuple[torch.Tensor, list[int]]:
    """(features (chunks, n_mels, chunk_samples // hop_length), audio frames per chunk): the
    waveform cut into ``chunk_samples`` pieces, the last zero-padded, each featurised as Whisper
    featurises one padded clip."""
    if chunk_samples % hop_length:
        raise AudioError(f"a chunk of {chunk_samples} samples is not a whole number of {hop_length}-sample hops")
    n = waveform.shape[0]
    chunks = max(1, math.ceil(n / chunk_samples))
    padded = np.zeros(chunks * chunk_samples, dtype=np.float32)
    padded[:n] = waveform
    feats = log_mel_spectrogram(torch.from_numpy(padded).view(chunks, chunk_samples), n_mels, n_fft, hop_length,
                                sampling_rate)
    frames = [valid_frames(min(chunk_samples, n - i * chunk_samples), hop_length) for i in range(chunks)]
    return feats, frames


# ---------------------------------------------------------------------------------------------
# Processing


@dataclass(frozen=True)
class ProcessedAudio:
    """A clip as a media item (``omnifuse.processing.media.MediaItem``)."""

    inputs: dict[str, torch.Tensor]  # input_features (chunks, mels, frames), audio_frames (chunks,)
    num_tokens: int  # tokens the encoder + connector keep: those of frames that hold audio
    keep: torch.Tensor  # (chunks * tokens per chunk,) bool: which of the encoder's tokens are kept
    num_samples: int  # at the model's rate
    sampling_rate: int
    attendable: torch.Tensor | None = None
    features: torch.Tensor | None = None
    modality: str = "audio"

    @property
    def seconds(self) -> float:
        return self.num_samples / self.sampling_rate


class AudioProcessor:
    """Turns audio sources into ``ProcessedAudio`` items for an ``AudioConfig``.

    ``chunk_tokens(frames)``: the tokens the encoder and connector make of a chunk with ``frames``
    audio frames (``encoders.audio.audio_tokens``); ``num_tokens`` adds them up over the chunks, a
    pure function of the clip's length."""

    def __init__(self, config: AudioConfig, chunk_tokens: Callable[[int], int]) -> None:
        self.config = config
        self.chunk_tokens = chunk_tokens
        self.tokens_per_chunk = chunk_tokens(config.chunk_frames)

    def _chunk_frames(self, num_samples: int) -> list[int]:
        c = self.config
        if num_samples <= 0:
            raise AudioError(f"an audio clip needs at least one sample, got {num_samples}")
        chunks = math.ceil(num_samples / c.chunk_samples)
        return [valid_frames(min(c.chunk_samples, num_samples - i * c.chunk_samples), c.hop_length)
                for i in range(chunks)]

    def num_tokens_for_samples(self, num_samples: int) -> int:
        """Tokens of a clip of ``num_samples`` samples at the model's rate."""
        return sum(self.chunk_tokens(f) for f in self._chunk_frames(num_samples))

    def num_tokens(self, seconds: float) -> int:
        """Tokens of a clip of ``seconds`` (rounded to whole samples at the model's rate)."""
        return self.num_tokens_for_samples(round(seconds * self.config.sampling_rate))

    def __call__(self, source: AudioSource) -> ProcessedAudio:
        c = self.config
        waveform = load_audio(source, c.sampling_rate, c.max_seconds)
        features, frames = chunk_features(waveform, c.chunk_samples, c.num_mel_bins, c.n_fft, c.hop_length,
                                          c.sampling_rate)
        keep = torch.zeros(len(frames), self.tokens_per_chunk, dtype=torch.bool)
        for i, f in enumerate(frames):
            keep[i, : self.chunk_tokens(f)] = True
        keep = keep.flatten()
        return ProcessedAudio(inputs={"input_features": features, "audio_frames": torch.tensor(frames)},
                              num_tokens=int(keep.sum()), keep=keep, num_samples=len(waveform),
                              sampling_rate=c.sampling_rate)
