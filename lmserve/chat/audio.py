"""Audio clips as the media policy sees them: the types taken (WAV and MP3, OpenAI's
input_audio formats), what the bytes themselves show, and a WAV header that tells the truth.

llama.cpp's mtmd decodes a clip (miniaudio) into 16 kHz mono float samples and allocates them
from the length the file declares, so a WAV whose header promises more samples than its bytes
hold is refused here, before it reaches the decoder.
"""

from __future__ import annotations

import struct

from lmserve.core.errors import invalid

AUDIO_TYPES = ("audio/wav", "audio/mpeg")
_AUDIO_ALIASES = {"audio/x-wav": "audio/wav", "audio/wave": "audio/wav",
                  "audio/vnd.wave": "audio/wav", "audio/vnd.wav": "audio/wav",
                  "audio/mp3": "audio/mpeg", "audio/mpeg3": "audio/mpeg",
                  "audio/x-mpeg-3": "audio/mpeg", "audio/x-mp3": "audio/mpeg"}
_NAMES = {"audio/wav": "WAV", "audio/mpeg": "MP3"}


def canonical_audio_type(media_type: str, param: str) -> str:
    value = media_type.split(";")[0].strip().lower()
    value = _AUDIO_ALIASES.get(value, value)
    if value not in AUDIO_TYPES:
        raise invalid(f"{param}: unsupported audio type '{media_type}'; send "
                      f"{', '.join(AUDIO_TYPES)} (format wav or mp3)", param=param,
                      code="unsupported_media_type")
    return value


def known_audio_type(media_type: str) -> str | None:
    """The canonical type of a Content-Type a server sent, if it is one of ours."""
    value = media_type.split(";")[0].strip().lower()
    value = _AUDIO_ALIASES.get(value, value)
    return value if value in AUDIO_TYPES else None


def sniff_audio(data: bytes) -> str | None:
    """The audio type the bytes show (as llama.cpp's helper tells audio from images)."""
    if len(data) < 12:
        return None
    if data[:4] == b"RIFF" and data[8:12] == b"WAVE":
        return "audio/wav"
    if data[:3] == b"ID3" or (data[0] == 0xFF and data[1] & 0xE0 == 0xE0):
        return "audio/mpeg"
    return None


def type_name(media_type: str) -> str:
    return _NAMES.get(media_type, media_type)


def check_wav(data: bytes, param: str) -> None:
    """A WAV's `fmt ` chunk is sound and its `data` chunk holds the bytes it declares."""
    at, fmt_ok = 12, False
    while at + 8 <= len(data):
        chunk, size = data[at:at + 4], struct.unpack_from("<I", data, at + 4)[0]
        body = at + 8
        if chunk == b"fmt ":
            if size < 16 or body + 16 > len(data):
                raise _bad_wav(param, "its fmt chunk is cut short")
            _, channels, rate, _, align = struct.unpack_from("<HHIIH", data, body)
            if not channels or not rate or not align:
                raise _bad_wav(param, "its fmt chunk gives no channels, sample rate or "
                                      "block size")
            fmt_ok = True
        elif chunk == b"data":
            if not fmt_ok:
                raise _bad_wav(param, "its data chunk comes before a fmt chunk")
            if size > len(data) - body:
                raise _bad_wav(param, f"its header declares {size} bytes of samples, but "
                                      f"{len(data) - body} follow")
            if size == 0:
                raise invalid(f"{param}: the audio clip holds no samples", param=param,
                              code="invalid_audio")
            return
        at = body + size + (size & 1)  # chunks are padded to an even length
    raise _bad_wav(param, "it has no fmt and data chunks")


def _bad_wav(param: str, why: str) -> Exception:
    return invalid(f"{param}: the WAV data is malformed: {why}", param=param,
                   code="invalid_audio")
