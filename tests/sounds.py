"""Audio clips for the audio tests, written by the stdlib (no sound files in the repository)."""

from __future__ import annotations

import io
import math
import wave


def wav(freq: float = 440.0, seconds: float = 0.5, rate: int = 4000) -> bytes:
    """A mono 8-bit WAV tone (llama.cpp resamples it to 16 kHz)."""
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(1)
        w.setframerate(rate)
        w.writeframes(bytes(128 + int(100 * math.sin(2 * math.pi * freq * i / rate))
                            for i in range(int(seconds * rate))))
    return buf.getvalue()
