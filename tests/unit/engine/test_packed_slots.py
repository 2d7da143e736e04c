"""Split KV (a stream per sequence id): slots stay packed on consecutive ids, batch rows go in
ascending id order, so llama.cpp's sequential micro-batch split runs one graph per step."""

from __future__ import annotations

from lmserve.engine.sequence import EngineRequest
from tests.unit.fakes import FakeRunner, reference_output
from tests.unit.engine.test_scheduler import Harness, prompt


def micro_batches(rows: list[int], n_ubatch: int = 512) -> int:
    """How many micro-batches llama.cpp's split_equal(sequential) makes of a batch whose rows
    belong to these sequence ids: each takes the same number of rows from a run of
    consecutive ids, in the order they first appear."""
    used = [False] * len(rows)
    count = 0
    while not all(used):
        run: list[int] = []
        for i, seq in enumerate(rows):
            if used[i] or seq in run or (run and seq != run[-1] + 1):
                continue
            run.append(seq)
        left = {s: sum(1 for i, r in enumerate(rows) if r == s and not used[i]) for s in run}
        take = max(1, min(min(left.values()), n_ubatch // len(run)))
        for seq in run:
            picked = 0
            for i, r in enumerate(rows):
                if r == seq and not used[i] and picked < take:
                    used[i], picked = True, picked + 1
        count += 1
    return count


def test_micro_batch_model_matches_llama_cpp_rules():
    assert micro_batches([0, 1, 2, 3]) == 1
    assert micro_batches([0, 2, 4, 6]) == 4
    assert micro_batches([1, 0, 2, 3]) == 2  # 1, 2, 3 together, then 0 alone
    assert micro_batches([0, 0, 0, 1, 2]) == 2  # a prompt chunk: one row each, then the rest


def run_mixed_load(packed: bool) -> tuple[Harness, list[int], list[int], list]:
    """24 requests of different lengths through 8 running sequences and 16 slots; per decode,
    its micro-batch count and how many requests still waited after it."""
    h = Harness(FakeRunner(batch=256), slots=16, running=8, budget=64)
    h.core.pool.packed = packed
    reqs = []
    for i in range(24):
        p, n = prompt(100 + i, 12 + (i * 7) % 20), 3 + (i * 5) % 17
        reqs.append((p, n, h.submit(p, max_tokens=n)))
    waiting = []
    while h.core.has_work:
        h.core.step()
        waiting.append(len(h.core.waiting))
    counts = [micro_batches([seq for _t, _p, seq, _l in d]) for d in h.runner.decodes]
    return h, counts, waiting, reqs


def test_packed_pool_keeps_steps_in_one_run_of_ids_while_work_waits():
    h, counts, waiting, reqs = run_mixed_load(packed=True)
    for p, n, req in reqs:
        assert h.tokens(req) == reference_output(p, n)
    full_steps = 0
    for d, count, queued in zip(h.runner.decodes, counts, waiting, strict=True):
        if not queued:
            continue  # draining: a sequence that ends mid-block leaves a gap nobody fills
        full_steps += 1
        ids = sorted({seq for _t, _p, seq, _l in d})
        assert ids == list(range(ids[0], ids[0] + len(ids))), ids
        # one micro-batch for the run, plus one for the rest of each prompt chunk
        chunked = sum(1 for s in ids if sum(1 for e in d if e[2] == s) > 1)
        assert count <= 1 + chunked
    assert full_steps >= 20
    _, unpacked, unpacked_waiting, _ = run_mixed_load(packed=False)
    scattered = [c for c, q in zip(unpacked, unpacked_waiting, strict=True) if q]
    assert sum(scattered) > sum(c for c, q in zip(counts, waiting, strict=True) if q)


def test_batch_rows_ascend_by_sequence_id():
    h, _, _, _ = run_mixed_load(packed=False)
    for d in h.runner.decodes:
        seqs = [seq for _t, _p, seq, _l in d]
        assert seqs == sorted(seqs)


def test_reused_prefix_is_copied_next_to_the_running_block_and_stays_resident():
    h = Harness(FakeRunner(), slots=8, running=4)
    h.core.pool.packed = True
    system = prompt(1, 40)
    first = h.submit(system + prompt(2, 5), max_tokens=2)
    h.run()
    assert [s.seq_id for s in h.core.pool.slots if s.cached] == [0]
    # Three long runners now take ids 1..3 beside the idle conversation in 0.
    runners = [h.submit(prompt(10 + i, 8), max_tokens=50) for i in range(3)]
    h.core.step()
    assert sorted(s.seq_id for s in h.core.pool.slots if s.busy) == [1, 2, 3]
    # Slot 0 is beside the block too, so the continuation runs in place there...
    follow = system + prompt(2, 5) + h.tokens(first) + [7]
    again = h.submit(follow, max_tokens=2)
    h.run()
    assert h.final(again).usage.cached_tokens == 40 + 5 + 2 - 1
    for i, r in enumerate(runners):
        assert h.tokens(r) == reference_output(prompt(10 + i, 8), 50)


def finished_conversation_in(h: Harness, tokens: list[int], seq_id: int) -> EngineRequest:
    """Run one request alone (it lands in slot 0), then move its resident KV to `seq_id`."""
    req = h.submit(tokens, max_tokens=2)
    h.run()
    pool = h.core.pool
    pool.slots[0].cached, pool.slots[seq_id].cached = [], pool.slots[0].cached
    h.runner.kv[seq_id], h.runner.kv[0] = h.runner.kv.pop(0), []
    return req


def test_isolated_idle_prefix_is_copied_rather_than_run_apart():
    h = Harness(FakeRunner(), slots=8, running=4)
    pool = h.core.pool
    pool.packed = True
    system = prompt(3, 40)
    # a's conversation sits in slot 6, away from where new work will run.
    finished_conversation_in(h, system + prompt(4, 5), 6)
    long_runs = [h.submit(prompt(20 + i, 8), max_tokens=40) for i in range(2)]
    h.core.step()
    assert sorted(s.seq_id for s in pool.slots if s.busy) == [0, 1]
    b = h.submit(system + prompt(5, 5), max_tokens=2)
    h.core.step()
    # b shares a's system prompt from slot 6 but runs in slot 2, next to the block ...
    assert sorted(s.seq_id for s in pool.slots if s.busy) == [0, 1, 2]
    h.run()
    assert h.final(b).usage.cached_tokens == 40
    assert h.tokens(b) == reference_output(system + prompt(5, 5), 2)
    # ... and a's whole conversation is still resident in slot 6.
    assert len(pool.slots[6].cached) == 40 + 5 + 2 - 1
    for i, r in enumerate(long_runs):
        assert h.tokens(r) == reference_output(prompt(20 + i, 8), 40)


def test_short_prefixes_are_not_worth_a_stream_copy():
    h = Harness(FakeRunner(), slots=4, running=2)
    pool = h.core.pool
    pool.packed = True
    assert pool.min_share == 16
    a = finished_conversation_in(h, prompt(8, 20), 3)
    busy = h.submit(prompt(9, 6), max_tokens=30)
    h.core.step()
    b = h.submit(prompt(8, 20)[:10] + prompt(10, 10), max_tokens=2)  # 10 tokens in common
    h.run()
    assert h.final(b).usage.cached_tokens == 0
    assert len(pool.slots[3].cached) == 21  # not copied, not truncated
    assert h.tokens(busy) == reference_output(prompt(9, 6), 30)
    assert h.tokens(a)


def closed_loop_runs(clients: int = 16, rounds: int = 4) -> tuple[list[tuple[int, int]], bool]:
    """`clients` closed-loop clients on 8 running sequences and 16 slots, each sending its next
    request when the last one ends. Clients come in three lengths, so several sequences end
    in the same step. Per decode: how many requests still waited, and how many runs of
    consecutive ids it had; and whether every output matched its single-request reference."""
    h = Harness(FakeRunner(batch=256), slots=16, running=8, budget=64)
    h.core.pool.packed = True
    lengths = [6 + 3 * (c % 3) for c in range(clients)]
    left = dict.fromkeys(range(clients), rounds)
    live: dict[str, tuple[int, EngineRequest, list[int]]] = {}
    done: list[tuple[EngineRequest, list[int], int]] = []

    def send(client: int) -> None:
        left[client] -= 1
        p = prompt(1000 + len(live) + len(done), 10)
        req = h.submit(p, max_tokens=lengths[client])
        live[req.request_id] = (client, req, p)

    for client in range(clients):
        send(client)
    layout = []
    while h.core.has_work:
        h.core.step()
        ids = sorted({seq for _t, _p, seq, _l in h.runner.decodes[-1]})
        layout.append((len(h.core.waiting), 1 + sum(1 for a, b in zip(ids, ids[1:]) if b != a + 1)))
        for rid in [r for r in live if any(o.finished for o in h.outputs.get(r, []))]:
            client, req, p = live.pop(rid)
            done.append((req, p, lengths[client]))
            if left[client]:
                send(client)
    correct = all(h.tokens(req) == reference_output(p, n) for req, p, n in done)
    return layout, correct and len(done) == clients * rounds


def test_sequences_ending_together_are_replaced_inside_the_busy_span():
    # Several sequences end in one step at the edge of the run; placing their replacements
    # one by one by neighbours alone grew a second run beside the hole (25 of 63 steps).
    layout, correct = closed_loop_runs()
    assert correct
    waited = [runs for queued, runs in layout if queued]
    assert len(waited) >= 40
    assert all(runs == 1 for runs in waited), waited


def test_a_continuation_runs_in_place_rather_than_evict_another_conversation():
    h = Harness(FakeRunner(), slots=4, running=3)
    pool = h.core.pool
    pool.packed = True
    # two finished conversations: a in slot 3, b in slot 2; the runners take 0 and 1
    a = finished_conversation_in(h, prompt(30, 24), 3)
    finished_conversation_in(h, prompt(31, 24), 2)
    b_tokens = pool.slots[2].cached[:]
    runners = [h.submit(prompt(40 + i, 6), max_tokens=30) for i in range(2)]
    h.core.step()
    assert sorted(s.seq_id for s in pool.slots if s.busy) == [0, 1]
    # a's next turn: slot 2 is beside the block, but copying a there would evict b
    follow = prompt(30, 24) + h.tokens(a) + [5]
    again = h.submit(follow, max_tokens=2)
    h.core.step()
    assert pool.slots[3].busy and pool.slots[2].cached == b_tokens
    h.run()
    assert h.final(again).usage.cached_tokens == 24 + 2 - 1
    assert h.tokens(again) == reference_output(follow, 2)
    for i, r in enumerate(runners):
        assert h.tokens(r) == reference_output(prompt(40 + i, 6), 30)
