"""What idle KV costs the decoders of a shared (unified) KV pool.

    python -m benchmarks.unified_span_cost [ROUNDS]

Raw llama_decode, SmolLM2, 2 threads, no scheduler. 8 sequences get 128-token prompts, then
decode 40 steps of one token each, in a pool that is empty or that first got 2400 cells of
other (idle) sequences; the two take turns, the order swapped every round. With unified KV
every query walks the pool's used span and skips masked cells one by one, so idle cells
below the running ones slow every step.
"""

from __future__ import annotations

import statistics
import sys

from benchmarks.harness.raw import decode_step_ms, prefill
from lmserve.engine.runner import Context, Model
from lmserve.models.resolve import resolve

IDLE_CELLS = 2400


def step_ms(ctx: Context, idle_cells: int) -> float:
    ctx.clear()
    for s in range(8, 8 + idle_cells // 300):  # idle sequences, 300 cells each, first
        prefill(ctx, s, [300 + (s * 7 + i) % 900 for i in range(300)])
    for s in range(8):
        prefill(ctx, s, [100 + s + i for i in range(128)])
    return decode_step_ms(ctx, range(8), 128, 40)


def main() -> None:
    rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 5
    model = Model(resolve("smollm2").path)
    ctx = Context(model, n_ctx=8192, n_seq_max=16, n_batch=512, n_threads=2, kv_unified=True)
    extra = []
    for r in range(rounds):
        order = (0, IDLE_CELLS) if r % 2 == 0 else (IDLE_CELLS, 0)
        ms = {idle: step_ms(ctx, idle) for idle in order}
        extra.append(ms[IDLE_CELLS] - ms[0])
        print(f"round {r + 1}: 8 decoders {ms[0]:.1f} ms/step alone, "
              f"{ms[IDLE_CELLS]:.1f} beside {IDLE_CELLS} idle cells", flush=True)
    print(f"median extra per step: {statistics.median(extra):.1f} ms")


if __name__ == "__main__":
    main()
