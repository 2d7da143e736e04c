"""The engine's own ceiling: the same model and parallelism driven in-process, no HTTP."""

from __future__ import annotations

import argparse
import asyncio
from collections.abc import AsyncIterator

from lmserve.bench.base import BenchRequest, Chunk
from lmserve.core.request import GenerationRequest, SamplingParams
from lmserve.models.resolve import resolve
from lmserve.service import EngineSettings, ModelService


class InProcessBackend:
    """Streams straight from a ModelService: what the server could do with zero overhead."""

    def __init__(self, service: ModelService) -> None:
        self.service = service
        self.name = f"in-process {service.name}"

    @classmethod
    async def start(cls, model: str, settings: EngineSettings) -> InProcessBackend:
        resolved = resolve(model)
        service = ModelService(resolved.name, resolved.path, settings)
        await asyncio.to_thread(service.load, asyncio.get_running_loop())
        return cls(service)

    async def stream(self, req: BenchRequest) -> AsyncIterator[Chunk]:
        request = GenerationRequest(prompt=req.prompt, max_tokens=req.max_tokens,
                                    ignore_eos=req.ignore_eos,
                                    sampling=SamplingParams(temperature=0.0))
        async for outputs in self.service.generate(request):
            for out in outputs:
                if out.token_ids:
                    yield Chunk(n_tokens=len(out.token_ids), text=out.text)

    async def aclose(self) -> None:
        await asyncio.to_thread(self.service.close)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("in-process backend (--backend inprocess)")
    group.add_argument("--engine-model", default="smollm2", help="model reference to load")
    group.add_argument("--parallel", type=int, default=8, help="parallel sequences")
    group.add_argument("--ctx", type=int, default=None, help="context size")
    group.add_argument("--threads", type=int, default=None, help="CPU threads")


async def factory(args: argparse.Namespace) -> InProcessBackend:
    settings = EngineSettings(n_ctx=args.ctx, parallel=args.parallel, threads=args.threads)
    return await InProcessBackend.start(args.engine_model, settings)
