"""Does a long prompt computed on its own threads, in a second context, cost the decoders less
than mixed steps do, for the same work?

    python -m benchmarks.prefill_lane_cost [ROUNDS]

Raw llama_decode, SmolLM2, no scheduler. 6 sequences decode one token a step while a seventh
sequence's 1,536-token prompt is computed, two ways, taking turns each round:

- mixed: one context on all threads; each step carries the 6 decode tokens and a 128-token
  chunk of the prompt (lmserve's default `--mixed-prefill`), until the prompt is done;
- lane: the decoders' context runs on half the threads while a second context over the same
  weights computes the prompt in 512-token chunks on the other half, in its own thread (ctypes
  lets go of the GIL inside llama_decode); then the prompt's KV is copied into the decoders'
  context (llama_state_seq_get/set_data), which is counted in the lane's time.

For each way: the wall time until the prompt's KV is in the decoders' context, the decode
steps done by then, and the longest and median decode step (the decoders' inter-token gap).
"""

from __future__ import annotations

import json
import statistics
import sys
import threading
import time

from benchmarks.harness.raw import prefill
from lmserve.engine.runner import Context, Model, default_threads
from lmserve.models.resolve import resolve

DECODERS = 6
PROMPT = 1536
MIXED_CHUNK = 128
LANE_CHUNK = 512
SLOT_CELLS = 4096


def _decode_step(ctx: Context, pos: int, chunk: list[int] | None = None,
                 chunk_pos: int = 0) -> None:
    ctx.batch.clear()
    for s in range(DECODERS):
        ctx.batch.add([300 + pos % 500], pos, s, True)
    if chunk:
        ctx.batch.add(chunk, chunk_pos, DECODERS, False)
    ctx.decode(ctx.batch)


def mixed(ctx: Context, prompt: list[int], pos: int) -> dict[str, float]:
    ctx.set_threads(default_threads())
    gaps = []
    start = time.perf_counter()
    for done in range(0, len(prompt), MIXED_CHUNK):
        t = time.perf_counter()
        _decode_step(ctx, pos, prompt[done:done + MIXED_CHUNK], done)
        gaps.append(time.perf_counter() - t)
        pos += 1
    wall = time.perf_counter() - start
    return {"wall_s": wall, "decode_steps": len(gaps), "gap_max_ms": max(gaps) * 1000,
            "gap_p50_ms": statistics.median(gaps) * 1000, "end_pos": pos}


def lane(ctx: Context, side: Context, prompt: list[int], pos: int) -> dict[str, float]:
    threads = default_threads()
    lane_threads = max(1, threads // 2)
    ctx.set_threads(max(1, threads - lane_threads))
    side.set_threads(lane_threads)
    done = threading.Event()
    state: dict[str, bytearray] = {}

    def compute() -> None:
        side.seq_rm(0, -1, -1)
        for start in range(0, len(prompt), LANE_CHUNK):
            side.batch.clear()
            side.batch.add(prompt[start:start + LANE_CHUNK], start, 0, False)
            side.decode(side.batch)
        state["kv"] = side.state_seq_get(0)
        done.set()

    gaps = []
    start = time.perf_counter()
    worker = threading.Thread(target=compute)
    worker.start()
    while not done.is_set():
        t = time.perf_counter()
        _decode_step(ctx, pos)
        gaps.append(time.perf_counter() - t)
        pos += 1
    worker.join()
    t = time.perf_counter()
    ctx.seq_rm(DECODERS, -1, -1)
    if not ctx.state_seq_set(DECODERS, state["kv"]):
        raise RuntimeError("the decoders' context refused the prompt's KV")
    copy_in = time.perf_counter() - t
    gaps.append(copy_in)
    wall = time.perf_counter() - start
    ctx.set_threads(threads)
    return {"wall_s": wall, "decode_steps": len(gaps) - 1, "gap_max_ms": max(gaps) * 1000,
            "gap_p50_ms": statistics.median(gaps) * 1000, "copy_in_ms": copy_in * 1000,
            "state_mib": len(state["kv"]) / 2**20, "end_pos": pos}


def main() -> None:
    rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 3
    model = Model(resolve("smollm2").path)
    threads = default_threads()
    ctx = Context(model, n_ctx=8 * SLOT_CELLS, n_seq_max=8, n_batch=512 + DECODERS,
                  n_threads=threads, kv_unified=False)
    side = Context(model, n_ctx=SLOT_CELLS, n_seq_max=1, n_batch=LANE_CHUNK,
                   n_threads=max(1, threads // 2))
    for s in range(DECODERS):
        prefill(ctx, s, [100 + s + i for i in range(64)])
    pos = 64
    results: dict[str, list[dict[str, float]]] = {"mixed": [], "lane": []}
    for r in range(rounds):
        prompt = [400 + (i * 7 + r * 31) % 900 for i in range(PROMPT)]
        for way in (("mixed", "lane") if r % 2 == 0 else ("lane", "mixed")):
            ctx.seq_rm(DECODERS, -1, -1)
            row = mixed(ctx, prompt, pos) if way == "mixed" else lane(ctx, side, prompt, pos)
            pos = int(row.pop("end_pos"))
            if pos > SLOT_CELLS - 200:  # the decoders start over rather than run out of room
                for s in range(DECODERS):
                    ctx.seq_rm(s, 64, -1)
                pos = 64
            results[way].append(row)
            print(way, json.dumps({k: round(v, 2) for k, v in row.items()}), flush=True)
    summary = {way: {k: statistics.median(row[k] for row in rows) for k in rows[0]}
               for way, rows in results.items()}
    print(json.dumps(summary, indent=1))
    m, lane_ = summary["mixed"], summary["lane"]
    # Work done: the prompt plus one token per decoder per step, in the same wall time
    # units; the rate of decode tokens while the prompt is computed, and the longest gap.
    for way, row in summary.items():
        rate = (PROMPT + DECODERS * row["decode_steps"]) / row["wall_s"]
        print(f"{way:5s}: {row['wall_s']:.2f} s for the prompt, {row['decode_steps']:.0f} "
              f"decode steps, tokens/s {rate:.0f}, gap max {row['gap_max_ms']:.0f} ms, "
              f"p50 {row['gap_p50_ms']:.0f} ms")
    print(f"lane / mixed: wall {lane_['wall_s'] / m['wall_s']:.2f}, "
          f"gap max {lane_['gap_max_ms'] / m['gap_max_ms']:.2f}")


if __name__ == "__main__":
    main()
