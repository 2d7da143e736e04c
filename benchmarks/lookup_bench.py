"""Prompt-lookup speculation on edit-this-text workloads: speed and identical output.

    python benchmarks/lookup_bench.py [--workload prose|code] [--model smollm2] [--rounds 3]

Starts `lmserve serve` twice on the same model, with speculation off (--lookup 0) and on
(--lookup N), and sends the same temperature-0 edit requests one at a time to each: correct
the spelling of a paragraph (prose) or rename a symbol in a short Python file (code), tasks
whose answer should mostly repeat the input. Each request starts from an empty KV cache.
Reports single-stream output tokens/s (request start to last token), the ratio on/off, the
acceptance rate from /metrics, the fraction of output tokens that were guessed right (how much
the model's answer really repeated its context), and whether every output was identical.
Results go to benchmarks/results/lookup-<workload>-<model>.json.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import httpx

from lmserve.bench.engine_metrics import counter_total
from lmserve.bench.procs import free_port, start_lmserve, stop


RESULTS = Path(__file__).parent / "results"

DOCUMENTS = [
    "The comittee met on tuesday to discuss the new budjet. Several members argued that the "
    "proposed cuts to the library would hurt students who depend on it for quiet study space, "
    "while others said the savings were neccessary to keep the swimming pool open through the "
    "winter. After a long debate the chair proposed a compromise: the library would close one "
    "hour earlier on weekdays, and the pool would raise its entry fee by fifty cents. The "
    "motion passed by seven votes to three, and the minutes were aproved without changes.",
    "To install the package, first create a virtual enviroment and activate it. Then run the "
    "install command with the version you need, and check that the import works by starting "
    "a Python shell. If the build fails, make sure a compiler is available and that the "
    "headers for your Python version are installed. On some systems you must also upgrade "
    "pip befor the build can find the right wheel. Once everything works, run the test suite "
    "to confirm that the instalation is complete and that no files are missing.",
    "Our garden had a good year. The tomatos ripened early in July, the beans climbed higher "
    "than the fence, and the pumpkins grew so large that we could barely lift them. The only "
    "problem was the slugs, which ate most of the lettuce before we noticed them. Next year we "
    "plan to build raised beds, add more compost to the soil, and plant marigolds along the "
    "edges, because neighbours say the flowers keep pests away from the vegtables.",
]


CODE = [
    "def compute_total(prices, tax_rate):\n    total = 0\n    for price in prices:\n"
    "        total += price\n    tax = total * tax_rate\n    return total + tax\n\n\n"
    "def print_receipt(items, tax_rate):\n    prices = [item['price'] for item in items]\n"
    "    for item in items:\n        print(item['name'], item['price'])\n"
    "    print('Total:', compute_total(prices, tax_rate))\n",
    "class Counter:\n    def __init__(self):\n        self.count = 0\n\n"
    "    def increment(self, step=1):\n        self.count += step\n        return self.count\n\n"
    "    def reset(self):\n        self.count = 0\n\n\ncounter = Counter()\n"
    "for i in range(10):\n    counter.increment()\nprint(counter.count)\n",
    "import json\n\n\ndef load_config(path):\n    with open(path) as f:\n"
    "        config = json.load(f)\n    if 'name' not in config:\n"
    "        raise ValueError('config needs a name')\n    return config\n\n\n"
    "def save_config(path, config):\n    with open(path, 'w') as f:\n"
    "        json.dump(config, f, indent=2)\n",
]
CODE_TASKS = ["Rename the function compute_total to sum_prices.", "Rename the class Counter to "
              "Tally.", "Rename the function load_config to read_config."]


def edit_prompt(document: str) -> list[dict[str, str]]:
    return [{"role": "system", "content": "You correct spelling. Reply with the corrected text "
             "only, unchanged otherwise."},
            {"role": "user", "content": f"Correct the spelling in this text:\n\n{document}"}]


def code_prompt(index: int) -> list[dict[str, str]]:
    return [{"role": "system", "content": "You edit code. Reply with the whole edited code "
             "only."},
            {"role": "user", "content": f"{CODE_TASKS[index]}\n\n```python\n{CODE[index]}```"}]


WORKLOADS = {"prose": [edit_prompt(d) for d in DOCUMENTS],
             "code": [code_prompt(i) for i in range(len(CODE))]}


def measure(base: str, model: str, rounds: int, max_tokens: int, prompts: list) -> dict:
    outputs, tokens, seconds = [], 0, 0.0
    with httpx.Client(base_url=base, timeout=600) as client:
        client.post("/v1/chat/completions", json={  # warm-up, not measured
            "model": model, "messages": edit_prompt("Helo world."), "max_tokens": 8})
        for _ in range(rounds):
            for messages in prompts:
                body = {"model": model, "messages": messages, "temperature": 0,
                        "max_tokens": max_tokens}
                # Each request starts from an empty KV, so both runs do the same arithmetic
                # (see docs/architecture.md, "Identical output, up to float rounding").
                assert client.post("/flush_cache").status_code == 200
                t0 = time.perf_counter()
                reply = client.post("/v1/chat/completions", json=body).json()
                seconds += time.perf_counter() - t0
                tokens += reply["usage"]["completion_tokens"]
                outputs.append(reply["choices"][0]["message"]["content"])
        text = client.get("/metrics").text
    return {"tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds,
            "drafted": counter_total(text, "lmserve_lookup_draft_tokens"),
            "accepted": counter_total(text, "lmserve_lookup_accepted_tokens"), "outputs": outputs}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--lookup", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--max-tokens", type=int, default=200)
    ap.add_argument("--workload", choices=sorted(WORKLOADS), default="prose",
                    help="prose: correct the spelling of a paragraph; code: rename a "
                         "symbol in a short Python file")
    ap.add_argument("--tag", default="lookup")
    args = ap.parse_args()
    results = {}
    for label, lookup in (("off", 0), ("on", args.lookup)):
        port = free_port()
        proc = start_lmserve(args.model, port, "--threads", str(args.threads), "--parallel",
                             "4", "--ctx", "4096", "--lookup", str(lookup), "--store", "memory")
        try:
            results[label] = measure(f"http://127.0.0.1:{port}", args.model, args.rounds,
                                     args.max_tokens, WORKLOADS[args.workload])
        finally:
            stop(proc)
    on, off = results["on"], results["off"]
    summary = {
        "model": args.model, "threads": args.threads, "lookup": args.lookup,
        "workload": args.workload,
        "tokens_per_s_off": round(off["tokens_per_s"], 2),
        "tokens_per_s_on": round(on["tokens_per_s"], 2),
        "speedup": round(on["tokens_per_s"] / off["tokens_per_s"], 3),
        "acceptance": round(on["accepted"] / on["drafted"], 3) if on["drafted"] else None,
        # Output tokens that were guessed right from the context: how much the output repeats.
        "guessed_fraction": round(on["accepted"] / on["tokens"], 3),
        "identical_outputs": on["outputs"] == off["outputs"],
        "requests": len(on["outputs"]),
    }
    print(json.dumps(summary, indent=2))
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{args.tag}-{args.workload}-{args.model}.json").write_text(
        json.dumps({"summary": summary, "runs": results}, indent=2))


if __name__ == "__main__":
    main()
