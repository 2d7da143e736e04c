"""Raw llama_decode cost per step as the number of decoding sequences grows (no scheduler).

    python -m benchmarks.decode_batch_scaling [MODEL] [THREADS]

Shows how much batching can give on this CPU: each sequence gets a 128-token prompt, then
30 steps decode one token for every sequence.
"""

from __future__ import annotations

import sys

from benchmarks.harness.raw import decode_step_ms, prefill
from lmserve.engine.runner import Context, Model
from lmserve.models.resolve import resolve


def main() -> None:
    model = Model(resolve(sys.argv[1] if len(sys.argv) > 1 else "smollm2").path)
    threads = int(sys.argv[2]) if len(sys.argv) > 2 else 2
    ctx = Context(model, n_ctx=8192, n_seq_max=16, n_batch=512, n_threads=threads)
    for n_seq in (1, 2, 4, 8, 16):
        ctx.clear()
        for s in range(n_seq):
            prefill(ctx, s, [100 + s + i for i in range(128)])
        ms = decode_step_ms(ctx, range(n_seq), 128, 30)
        print(f"{n_seq:>2} sequences: {ms:6.1f} ms/step, {n_seq * 1000 / ms:6.0f} tok/s")


if __name__ == "__main__":
    main()
