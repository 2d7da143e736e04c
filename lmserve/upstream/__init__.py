"""Models served by another OpenAI-compatible server, behind lmserve's backend contract."""

from lmserve.upstream.backend import UpstreamBackend, UpstreamGeneration, UpstreamSettings

__all__ = ["UpstreamBackend", "UpstreamGeneration", "UpstreamSettings"]
