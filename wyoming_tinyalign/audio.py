"""Reading, writing and converting audio: one conversion path for files and Wyoming chunks.

Everything the models see is float32 mono at 16 kHz in [-1, 1]. PCM of any rate, width and channel
count goes through ``pcm_to_float``: channels are averaged, then Wyoming's own ``AudioChunkConverter``
converts width and rate, so audio from files and from satellites is resampled the same way.
"""

from __future__ import annotations

import io
import struct
import wave
from pathlib import Path

import numpy as np
from wyoming.audio import AudioChunk, AudioChunkConverter

from .files import write_atomic

TARGET_RATE = 16000

_PCM = 1
_IEEE_FLOAT = 3
_EXTENSIBLE = 0xFFFE


class AudioError(ValueError):
    """An audio file or buffer that cannot be read."""


def pcm_to_float(pcm: bytes, rate: int, width: int, channels: int) -> np.ndarray:
    """Convert PCM (width 1 = unsigned 8-bit; 2, 3, 4 = signed) to float32 mono 16 kHz in [-1, 1]."""
    if width not in (1, 2, 3, 4) or channels < 1 or rate < 1:
        raise ValueError(f"unsupported PCM format: rate={rate} width={width} channels={channels}")
    if len(pcm) % (width * channels):
        raise ValueError(f"PCM length {len(pcm)} is not a whole number of {width * channels}-byte frames")
    if channels > 1:
        # Average the channels as 32-bit samples (AudioChunkConverter sums stereo, which clips, and
        # cannot downmix more than 2 channels); the converter then does width and rate.
        wide = AudioChunkConverter(width=4).convert(AudioChunk(rate, width, channels, pcm)).audio
        frames = np.frombuffer(wide, dtype="<i4").reshape(-1, channels)
        pcm, width, channels = frames.mean(axis=1).astype("<i4").tobytes(), 4, 1
    converter = AudioChunkConverter(rate=TARGET_RATE, width=2, channels=1)
    out = converter.convert(AudioChunk(rate, width, channels, pcm)).audio
    return np.frombuffer(out, dtype="<i2").astype(np.float32) / np.float32(32768.0)


def float_to_pcm16(audio: np.ndarray) -> bytes:
    """Float samples in [-1, 1] (clipped) to little-endian signed 16-bit PCM."""
    return np.round(np.clip(audio, -1.0, 1.0) * 32767.0).astype("<i2").tobytes()


def as_stored(audio: np.ndarray) -> np.ndarray:
    """The samples that a WAV `write_wav` makes of float32 mono 16 kHz `audio` reads back as."""
    return np.frombuffer(float_to_pcm16(audio), dtype="<i2").astype(np.float32) / np.float32(32768.0)


def decode_wav(data: bytes, name: str = "<bytes>") -> np.ndarray:
    """Decode a WAV file's bytes (PCM 8/16/24/32-bit, IEEE float 32/64-bit) to float32 mono 16 kHz.

    A data chunk declaring more bytes than there are (streaming writers such as ``espeak-ng --stdout``)
    is read up to the end of the file.
    """
    if len(data) < 12 or data[:4] != b"RIFF" or data[8:12] != b"WAVE":
        raise AudioError(f"{name}: not a RIFF/WAVE file")
    fmt: tuple[int, int, int, int, int] | None = None
    pos = 12
    while pos + 8 <= len(data):
        chunk_id, size = data[pos : pos + 4], int.from_bytes(data[pos + 4 : pos + 8], "little")
        body = pos + 8
        if chunk_id == b"fmt ":
            if size < 16 or body + size > len(data):
                raise AudioError(f"{name}: truncated fmt chunk")
            tag, channels, rate, _, block_align, bits = struct.unpack_from("<HHIIHH", data, body)
            if tag == _EXTENSIBLE:
                if size < 40:
                    raise AudioError(f"{name}: short WAVE_FORMAT_EXTENSIBLE fmt chunk")
                tag = struct.unpack_from("<H", data, body + 24)[0]  # first 2 bytes of the SubFormat GUID
            fmt = (tag, channels, rate, block_align, bits)
        elif chunk_id == b"data":
            if fmt is None:
                raise AudioError(f"{name}: data chunk before fmt chunk")
            return _decode_samples(data[body : body + size], *fmt, name=name)
        pos = body + size + (size & 1)
    raise AudioError(f"{name}: {'no data chunk' if fmt else 'no fmt chunk'}")


def _decode_samples(
    payload: bytes, tag: int, channels: int, rate: int, block_align: int, bits: int, *, name: str
) -> np.ndarray:
    width = bits // 8
    if channels < 1 or rate < 1 or bits % 8 or block_align != width * channels:
        raise AudioError(f"{name}: bad fmt chunk (channels={channels} rate={rate} bits={bits})")
    payload = payload[: len(payload) - len(payload) % block_align]
    if tag == _PCM and width in (1, 2, 3, 4):
        return pcm_to_float(payload, rate, width, channels)
    if tag == _IEEE_FLOAT and width in (4, 8):
        samples = np.frombuffer(payload, dtype="<f4" if width == 4 else "<f8")
        if not np.all(np.isfinite(samples)):
            raise AudioError(f"{name}: float samples that are NaN or infinite")
        pcm = np.round(np.clip(samples, -1.0, 1.0) * 2147483647.0).astype("<i4").tobytes()
        return pcm_to_float(pcm, rate, 4, channels)
    raise AudioError(f"{name}: unsupported sample format (format tag {tag}, {bits} bits)")


def read_wav(path: Path | str) -> np.ndarray:
    """Read a WAV file of any rate, width and channel count as float32 mono 16 kHz."""
    try:
        data = Path(path).read_bytes()
    except OSError as err:
        raise AudioError(f"{path}: {err.strerror or err}") from err
    return decode_wav(data, str(path))


def write_wav(
    path: Path | str, audio: np.ndarray, rate: int = TARGET_RATE, width: int = 2, channels: int = 1
) -> None:
    """Write float32 mono 16 kHz audio as a PCM WAV in the requested format, atomically."""
    if channels not in (1, 2):
        raise ValueError(f"can write 1 or 2 channels, not {channels}")
    chunk = AudioChunk(TARGET_RATE, 2, 1, float_to_pcm16(audio))
    # Resample at 16 bits, then change width: the converter resamples *after* changing width, and
    # audioop's resampler treats 8-bit samples as signed while 8-bit WAV is unsigned.
    chunk = AudioChunkConverter(rate=rate, channels=channels).convert(chunk)
    chunk = AudioChunkConverter(width=width).convert(chunk)
    buf = io.BytesIO()
    with wave.open(buf, "wb") as out:
        out.setnchannels(channels)
        out.setsampwidth(width)
        out.setframerate(rate)
        out.writeframes(chunk.audio)
    write_atomic(Path(path), buf.getvalue())
