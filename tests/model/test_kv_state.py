"""A sequence's saved state (engine.kv_state's envelope) on the real models: it loads under
another KV layout, another slot count and another sequence id, and the loaded KV gives the
same logits to the bit. Gemma 3 has sliding-window layers, so its state has two caches."""

from __future__ import annotations

import numpy as np
import pytest

from lmserve.engine.runner import Context, Model
from lmserve.models.resolve import resolve

PROMPT = [100 + (i * 37) % 5000 for i in range(300)]


@pytest.fixture(scope="module", params=["smollm2", "gemma3-270m"])
def model(request: pytest.FixtureRequest):
    m = Model(resolve(request.param).path)
    yield m
    m.close()


def next_logits(ctx: Context, seq_id: int) -> np.ndarray:
    """The logits after the prompt, whose KV but the last token `seq_id` holds (the last
    token's row is removed again)."""
    ctx.batch.clear()
    ctx.batch.add([PROMPT[-1]], len(PROMPT) - 1, seq_id, True)
    assert ctx.decode(ctx.batch) == 0
    logits = ctx.logits_row(ctx.batch.n - 1).copy()
    ctx.seq_rm(seq_id, len(PROMPT) - 1, -1)
    return logits


def computed(ctx: Context, seq_id: int) -> np.ndarray:
    """next_logits with the prompt computed in `seq_id` itself, then the sequence emptied."""
    ctx.seq_rm(seq_id, -1, -1)
    ctx.batch.clear()
    ctx.batch.add(PROMPT[:-1], 0, seq_id, False)
    assert ctx.decode(ctx.batch) == 0
    logits = next_logits(ctx, seq_id)
    ctx.seq_rm(seq_id, -1, -1)
    return logits


def test_a_state_loads_under_any_layout_and_gives_the_same_logits(model):
    """Loaded KV is the KV computed there: the same logits to the bit as the prompt computed
    in that context (across layouts the logits differ a little anyway, as the cells each
    attention sums over are laid out otherwise)."""
    split = Context(model, n_ctx=4 * 512, n_seq_max=4, n_batch=512, n_threads=2,
                    kv_unified=False)
    shared = Context(model, n_ctx=3 * 512, n_seq_max=3, n_batch=512, n_threads=2)
    side = Context(model, n_ctx=512, n_seq_max=1, n_batch=512, n_threads=1)
    try:
        split.batch.clear()
        split.batch.add(PROMPT[:-1], 0, 2, False)
        assert split.decode(split.batch) == 0
        state = split.state_seq_get(2)
        for ctx, seq_id in ((shared, 1), (side, 0), (split, 3)):
            reference = computed(ctx, seq_id)
            assert ctx.state_seq_set(seq_id, bytearray(state))
            assert np.array_equal(next_logits(ctx, seq_id), reference)
        # and back from the one-stream context into another slot of the split one
        split.seq_rm(0, -1, -1)
        assert split.state_seq_set(0, side.state_seq_get(0))
        assert np.array_equal(next_logits(split, 0), computed(split, 1))
        # a raw llama.cpp state (no envelope) is refused, and leaves the sequence empty
        assert split.state_seq_set(1, bytearray(b"\xd8\x3c\x14\xaf" + bytes(60))) == 0
    finally:
        for ctx in (split, shared, side):
            ctx.close()
