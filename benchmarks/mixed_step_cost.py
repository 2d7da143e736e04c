"""What a step costs when a prompt chunk rides along with decoding sequences.

    python -m benchmarks.mixed_step_cost [ROUNDS]

Raw llama_decode, SmolLM2, 2 threads, a KV stream per slot (the default layout), no
scheduler: 6 sequences decode one token each while a seventh sequence, 1,000 tokens into its
prompt, adds N more prompt tokens in the same step (N = 0, 16, ..., 512; the chunk is removed
again after each timed step, so every step sees the same positions). The sizes take turns,
the order reversed every round. The cost per prompt token at each N is what decides how far
--mixed-prefill can shrink a chunk before prefill itself gets slower.
"""

from __future__ import annotations

import json
import statistics
import sys
import time

from benchmarks.harness.raw import prefill
from lmserve.engine.runner import Context, Model
from lmserve.models.resolve import resolve

SIZES = (0, 16, 32, 64, 128, 256, 512)
DECODERS = 6
POSITION = 1000


def step_ms(ctx: Context, n: int, step: int, reps: int = 3) -> float:
    times = []
    for r in range(reps):
        ctx.batch.clear()
        for s in range(DECODERS):
            ctx.batch.add([300 + step + r], 64 + step * reps + r, s, True)
        if n:
            ctx.batch.add([500 + (i * 13) % 700 for i in range(n)], POSITION, DECODERS, True)
        start = time.perf_counter()
        ctx.decode(ctx.batch)
        times.append((time.perf_counter() - start) * 1000)
        if n:
            ctx.seq_rm(DECODERS, POSITION, -1)
    return statistics.median(times)


def main() -> None:
    rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 3
    model = Model(resolve("smollm2").path)
    ctx = Context(model, n_ctx=8 * 4096, n_seq_max=8, n_batch=512 + DECODERS, n_threads=2,
                  kv_unified=False)
    for s in range(DECODERS):
        prefill(ctx, s, [100 + s + i for i in range(64)])
    prompt = [400 + (i * 7) % 900 for i in range(POSITION)]
    for start in range(0, POSITION, 500):  # within the batch's room
        ctx.batch.clear()
        ctx.batch.add(prompt[start:start + 500], start, DECODERS, True)
        ctx.decode(ctx.batch)
    results: dict[int, list[float]] = {n: [] for n in SIZES}
    step = 0
    for r in range(rounds):
        for n in (SIZES if r % 2 == 0 else tuple(reversed(SIZES))):
            results[n].append(step_ms(ctx, n, step))
            step += 1
    base = statistics.median(results[0])
    rows = {n: {"step_ms": statistics.median(v),
                "ms_per_prompt_token": (statistics.median(v) - base) / n if n else None}
            for n, v in results.items()}
    print(json.dumps(rows, indent=1))
    for n, row in rows.items():
        per = row["ms_per_prompt_token"]
        print(f"N={n:4d}  step {row['step_ms']:7.1f} ms" +
              (f"  {per:.2f} ms per prompt token" if per is not None else ""))


if __name__ == "__main__":
    main()
