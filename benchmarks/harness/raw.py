"""Raw llama_decode timing for the benchmark scripts: no scheduler, no sampling."""

from __future__ import annotations

import time

from lmserve.engine.runner import Context


def prefill(ctx: Context, seq_id: int, tokens: list[int]) -> None:
    """Decode `tokens` as sequence `seq_id`'s prompt, from position 0, in one batch."""
    ctx.batch.clear()
    ctx.batch.add(tokens, 0, seq_id, True)
    ctx.decode(ctx.batch)


def decode_step_ms(ctx: Context, seq_ids: range, start_pos: int, steps: int) -> float:
    """Mean ms of `steps` decode steps that each give every sequence one token."""
    start = time.perf_counter()
    for step in range(steps):
        ctx.batch.clear()
        for s in seq_ids:
            ctx.batch.add([200 + step], start_pos + step, s, True)
        ctx.decode(ctx.batch)
    return (time.perf_counter() - start) / steps * 1000
