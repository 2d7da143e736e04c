"""benchmarks.harness.raw, the raw llama_decode timing that the benchmark scripts share, on the real
model: the prompts and decode steps land in the KV where the scripts assume they do."""

from __future__ import annotations

from collections.abc import Iterator

import llama_cpp as ll
import pytest

from benchmarks.harness.raw import decode_step_ms, prefill
from lmserve.engine.runner import Context, Model


@pytest.fixture(scope="module")
def context(model_path: str) -> Iterator[Context]:
    model = Model(model_path)
    ctx = Context(model, n_ctx=1024, n_seq_max=4, n_batch=256, n_threads=2, kv_unified=False)
    yield ctx
    ctx.close()
    model.close()


def test_prefill_then_decode_steps_extend_every_sequence(context: Context) -> None:
    context.clear()
    for s in range(3):
        prefill(context, s, [100 + s + i for i in range(20)])
    ms = decode_step_ms(context, range(3), 20, 5)
    assert ms > 0
    # each sequence now holds positions 0..24: 20 prompt tokens and 5 decoded ones
    assert [ll.llama_memory_seq_pos_max(context.memory, s) for s in range(4)] == [24, 24, 24, -1]
