"""Paired measurement: several backends take turns level by level, round after round.

This VM's speed drifts by up to about 30% over minutes, so figures measured one backend after
another are not comparable. Here every concurrency level is run by each backend in turn, the
order rotated by one at every level and every round, so a slow spell hits them alike; ratios
are then taken within a round. Every request has its own numbered prompt, so no backend,
round or level profits from another's prompt cache.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

from lmserve.bench.base import Backend
from lmserve.bench.prompts import make_prompts
from lmserve.bench.runner import run_level
from lmserve.bench.scenarios import LevelProbe, default_requests_per_level
from lmserve.bench.stats import LevelResult

Round = dict[str, dict[int, LevelResult]]  # backend name -> concurrency -> level


def rotated(names: Sequence[str], k: int) -> list[str]:
    """`names` rotated left by k."""
    k %= len(names)
    return [*names[k:], *names[:k]]


async def take_turns(backends: Mapping[str, Backend], concurrencies: Sequence[int], *,
                     rounds: int, input_len: int, output_len: int,
                     requests_per_level: int | None = None,
                     probes: Mapping[str, LevelProbe] | None = None,
                     on_level: Callable[[int, str, LevelResult], None] | None = None,
                     ) -> list[Round]:
    """Run every level on every backend, in turn, for `rounds` rounds.

    requests_per_level defaults to max(4, 2 x concurrency). A backend with a probe has it
    started before and finished after each of its levels, into the level's `engine` entry.
    `on_level(round index, backend name, level)` is called after each level.
    """
    probes = probes or {}
    out: list[Round] = []
    first_index = 0
    for r in range(rounds):
        result: Round = {name: {} for name in backends}
        for i, c in enumerate(concurrencies):
            count = requests_per_level or default_requests_per_level(c)
            for name in rotated(list(backends), r + i):
                prompts = make_prompts(count, input_len, max_tokens=output_len,
                                       first_index=first_index)
                first_index += count
                probe = probes.get(name)
                if probe is not None:
                    await probe.start()
                level = await run_level(backends[name], prompts, c, count)
                if probe is not None:
                    level.engine = await probe.finish()
                result[name][c] = level
                if on_level is not None:
                    on_level(r, name, level)
        out.append(result)
    return out
