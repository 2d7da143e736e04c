"""Write a random LoRA adapter GGUF for a base model: a test fixture, not a trained adapter.

Each targeted weight W (numpy shape [n_out, n_in]) gets a random low-rank delta B @ A with
A: [rank, n_in] and B: [n_out, rank], the layout llama.cpp's loader checks (in GGUF ne order,
lora_a is [n_in, rank] and lora_b is [rank, n_out]). The delta's RMS is `strength` times the
base tensor's own RMS, so the same strength means about the same push on any model; 0.1 on
the attention and MLP projections of SmolLM2-135M visibly changes greedy output. Much stronger
deltas are not a fair test: from about 0.15 on that model, activations leave the range where
llama.cpp's results are independent of batch shape (a prompt prefilled whole and one prefilled
in two chunks then give different logits), with or without batching other sequences.

The file says `adapter.lora.alpha = rank`, so llama.cpp's alpha/rank factor is 1 and the
request's LoRA scale multiplies the delta exactly as written.

Factors are F32 by default. `--type q8_0` stores them as Q8_0 (the rank must then be a
multiple of 32): llama.cpp multiplies those with integer dot products over quantized
activations, as it does quantized base weights, so a sequence's logits no longer depend on
which other sequences share its batch. F32 factors go through float kernels whose summation
order changes with the batch size, which can swap two near-tied greedy candidates.

    python scripts/make_test_lora.py BASE.gguf OUT.gguf --seed 1 --strength 0.1
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np
from gguf import GGMLQuantizationType, GGUFReader, GGUFType, GGUFWriter
from gguf.quants import dequantize, quantize

DEFAULT_TARGETS = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")


@dataclass(frozen=True)
class LoraOptions:
    rank: int = 8
    seed: int = 0
    strength: float = 0.1
    targets: tuple[str, ...] = DEFAULT_TARGETS
    tensor_type: str = "f32"  # f32 | f16 | q8_0


def make_lora(base_path: str, out_path: str, options: LoraOptions = LoraOptions()) -> int:
    """Write the adapter; returns how many base tensors it adapts."""
    reader = GGUFReader(base_path)
    architecture = _architecture(reader)
    rng = np.random.default_rng(options.seed)
    writer = GGUFWriter(out_path, architecture)
    writer.add_type(GGUFType.ADAPTER)
    writer.add_string("adapter.type", "lora")
    writer.add_float32("adapter.lora.alpha", float(options.rank))
    count = 0
    for name, weight in _targets(reader, options.targets):
        lora_a, lora_b = _low_rank_delta(weight, options.rank, options.strength, rng)
        _add(writer, f"{name}.lora_a", lora_a, options.tensor_type)
        _add(writer, f"{name}.lora_b", lora_b, options.tensor_type)
        count += 1
    if count == 0:
        writer.close()
        raise ValueError(f"{base_path} has no 2-D tensors named like {options.targets}")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return count


def _add(writer: GGUFWriter, name: str, data: np.ndarray, tensor_type: str) -> None:
    if tensor_type == "q8_0":
        kind = GGMLQuantizationType.Q8_0
        writer.add_tensor(name, quantize(data, kind), raw_dtype=kind)
    else:
        writer.add_tensor(name, data.astype(np.float16 if tensor_type == "f16" else np.float32))


def _architecture(reader: GGUFReader) -> str:
    field = reader.fields.get("general.architecture")
    if field is None:
        raise ValueError("the base GGUF has no general.architecture")
    return str(field.contents())


def _targets(reader: GGUFReader, targets: Iterable[str]) -> Iterator[tuple[str, np.ndarray]]:
    """(name, dequantized weight [n_out, n_in]) of every 2-D block weight named in targets."""
    wanted = tuple(f".{t}.weight" for t in targets)
    for tensor in reader.tensors:
        if tensor.name.startswith("blk.") and tensor.name.endswith(wanted) \
                and len(tensor.shape) == 2:
            weight = dequantize(tensor.data, GGMLQuantizationType(tensor.tensor_type))
            yield tensor.name, weight.reshape(int(tensor.shape[1]), int(tensor.shape[0]))


def _low_rank_delta(weight: np.ndarray, rank: int, strength: float,
                    rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    n_out, n_in = weight.shape
    lora_a = rng.standard_normal((rank, n_in)) / np.sqrt(n_in)
    lora_b = rng.standard_normal((n_out, rank)) / np.sqrt(rank)
    # Entries of B @ A have RMS about 1/sqrt(n_in); rescale to strength x the weight's RMS.
    target_rms = strength * float(np.sqrt(np.mean(np.square(weight, dtype=np.float64))))
    lora_b *= target_rms * np.sqrt(n_in)
    return lora_a.astype(np.float32), lora_b.astype(np.float32)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("base", help="the base model GGUF (any quantization)")
    parser.add_argument("out", help="where to write the adapter GGUF")
    parser.add_argument("--rank", type=int, default=LoraOptions.rank)
    parser.add_argument("--seed", type=int, default=LoraOptions.seed)
    parser.add_argument("--strength", type=float, default=LoraOptions.strength,
                        help="delta RMS as a fraction of each base tensor's RMS (default 0.1)")
    parser.add_argument("--targets", default=",".join(DEFAULT_TARGETS),
                        help="comma-separated tensor kinds to adapt (default: %(default)s)")
    parser.add_argument("--type", dest="tensor_type", choices=["f32", "f16", "q8_0"],
                        default="f32", help="how the factors are stored (default f32)")
    args = parser.parse_args(argv)
    if args.rank < 1 or (args.tensor_type == "q8_0" and args.rank % 32):
        parser.error("--rank must be at least 1, and a multiple of 32 with --type q8_0")
    options = LoraOptions(rank=args.rank, seed=args.seed, strength=args.strength,
                          targets=tuple(t.strip() for t in args.targets.split(",") if t.strip()),
                          tensor_type=args.tensor_type)
    count = make_lora(args.base, args.out, options)
    print(f"wrote {args.out}: {count} adapted tensors, rank {args.rank}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
