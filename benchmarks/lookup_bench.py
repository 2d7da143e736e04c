"""Prompt-lookup speculation on edit-this-text workloads: speed and identical output.

    python -m benchmarks.lookup_bench [--workload prose|code|prose-raw] [--model smollm2]
                                      [--rounds 3]

Starts `lmserve serve` twice on the same model, with speculation off (--lookup 0) and on
(--lookup N), and sends the same temperature-0 edit requests one at a time, each to both
servers back to back, alternating which goes first: correct
the spelling of a paragraph (prose; prose-raw is the same task as plain text for a base model
such as Gemma 3 270M) or rename a symbol in a short Python file (code), tasks whose answer
should mostly repeat the input. Each request starts from an empty KV cache and is streamed.
Reports single-stream output tokens/s (request start to last token, prefill included) and the
decode rate after the first token, the ratios on/off, the
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

from benchmarks.harness.engine_metrics import counter_total
from benchmarks.harness.procs import free_port, start_lmserve, stop

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


def raw_edit_prompt(document: str) -> str:
    """The prose task as plain text, for base models with no chat template (Gemma 3 270M)."""
    return ("Correct the spelling in this text. Reply with the corrected text only, unchanged "
            f"otherwise.\n\nText: {document}\n\nCorrected text:")


# A workload is a list of prompts: chat messages (sent to /v1/chat/completions) or plain
# text (sent to /v1/completions).
WORKLOADS: dict[str, list] = {"prose": [edit_prompt(d) for d in DOCUMENTS],
                              "code": [code_prompt(i) for i in range(len(CODE))],
                              "prose-raw": [raw_edit_prompt(d) for d in DOCUMENTS]}


def stream_one(client: httpx.Client, model: str, prompt, max_tokens: int) -> dict:
    """One streamed temperature-0 request: its text, token count and timings."""
    chat = not isinstance(prompt, str)
    body = {"model": model, "temperature": 0, "max_tokens": max_tokens, "stream": True,
            "stream_options": {"include_usage": True},
            **({"messages": prompt} if chat else {"prompt": prompt})}
    parts, tokens, first = [], 0, None
    t0 = time.perf_counter()
    with client.stream("POST", "/v1/chat/completions" if chat else "/v1/completions",
                       json=body) as reply:
        reply.raise_for_status()
        for line in reply.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            if event.get("usage"):
                tokens = event["usage"]["completion_tokens"]
            for choice in event.get("choices", []):
                piece = choice["delta"].get("content") if chat else choice.get("text")
                if piece:
                    first = first or time.perf_counter()
                    parts.append(piece)
    end = time.perf_counter()
    return {"text": "".join(parts), "tokens": tokens, "seconds": end - t0,
            "decode_seconds": end - (first or end)}


class Tally:
    """What one server (speculation off or on) produced and how long it took."""

    def __init__(self) -> None:
        self.outputs: list[str] = []
        self.tokens = self.decode_tokens = 0
        self.seconds = self.decode_seconds = 0.0

    def add(self, one: dict) -> None:
        self.outputs.append(one["text"])
        self.tokens += one["tokens"]
        self.seconds += one["seconds"]
        self.decode_tokens += max(0, one["tokens"] - 1)
        self.decode_seconds += one["decode_seconds"]

    def result(self, metrics: str) -> dict:
        return {"tokens": self.tokens, "seconds": self.seconds,
                "tokens_per_s": self.tokens / self.seconds,
                # after the first token: the decode rate, without the prompt's prefill
                "decode_tokens_per_s": self.decode_tokens / self.decode_seconds
                if self.decode_seconds else 0.0,
                "drafted": counter_total(metrics, "lmserve_lookup_draft_tokens"),
                "accepted": counter_total(metrics, "lmserve_lookup_accepted_tokens"),
                "outputs": self.outputs}


def measure(bases: dict[str, str], model: str, rounds: int, max_tokens: int,
            prompts: list) -> dict:
    """Every prompt goes to both servers back to back, alternating which goes first, so a
    change in the machine's speed during the run (large on this VM) hits both alike."""
    clients = {label: httpx.Client(base_url=base, timeout=600) for label, base in bases.items()}
    tallies = {label: Tally() for label in bases}
    try:
        for client in clients.values():
            stream_one(client, model, prompts[0], 8)  # warm-up, not measured
        turn = 0
        for _ in range(rounds):
            for prompt in prompts:
                order = list(clients) if turn % 2 == 0 else list(reversed(clients))
                turn += 1
                for label in order:
                    client = clients[label]
                    # Each request starts from an empty KV, so both do the same arithmetic
                    # (see docs/architecture.md, "Identical output, up to float rounding").
                    assert client.post("/flush_cache").status_code == 200
                    tallies[label].add(stream_one(client, model, prompt, max_tokens))
        return {label: tallies[label].result(clients[label].get("/metrics").text)
                for label in clients}
    finally:
        for client in clients.values():
            client.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--lookup", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--max-tokens", type=int, default=200)
    ap.add_argument("--workload", choices=sorted(WORKLOADS), default="prose",
                    help="prose: correct the spelling of a paragraph; code: rename a "
                         "symbol in a short Python file; prose-raw: prose as plain text "
                         "for a base model")
    ap.add_argument("--tag", default="lookup")
    ap.add_argument("server_args", nargs="*", help="more `lmserve serve` flags, after --")
    args = ap.parse_args()
    procs, bases = [], {}
    try:
        for label, lookup in (("off", 0), ("on", args.lookup)):
            port = free_port()
            procs.append(start_lmserve(
                args.model, port, "--threads", str(args.threads), "--parallel", "4", "--ctx",
                "4096", "--lookup", str(lookup), "--store", "memory", *args.server_args))
            bases[label] = f"http://127.0.0.1:{port}"
        results = measure(bases, args.model, args.rounds, args.max_tokens,
                          WORKLOADS[args.workload])
    finally:
        for proc in procs:
            stop(proc)
    on, off = results["on"], results["off"]
    summary = {
        "model": args.model, "threads": args.threads, "lookup": args.lookup,
        "workload": args.workload, "server_args": args.server_args,
        "tokens_per_s_off": round(off["tokens_per_s"], 2),
        "tokens_per_s_on": round(on["tokens_per_s"], 2),
        "speedup": round(on["tokens_per_s"] / off["tokens_per_s"], 3),
        "decode_tokens_per_s_off": round(off["decode_tokens_per_s"], 2),
        "decode_tokens_per_s_on": round(on["decode_tokens_per_s"], 2),
        "decode_speedup": round(on["decode_tokens_per_s"] / off["decode_tokens_per_s"], 3),
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
