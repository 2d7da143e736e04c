"""Write a tiny GLM-4.5-style (`glm4moe`) model with one NextN / MTP layer and random weights:
a test fixture for MTP drafting (`--draft mtp`), not a trained model, in the way llama.cpp's
own CI tests plumbing with tiny random models.

GLM4-MoE is the smallest architecture this llama.cpp build drafts with NextN layers through
plain attention (Qwen3.5 / Qwen3-Next are recurrent hybrids, DeepSeek's use MLA): a trunk of
`layers` blocks (the first dense, the rest mixture-of-experts with a shared expert) and,
after them, one NextN block (`blk.{layers}.nextn.{eh_proj,enorm,hnorm}` plus a MoE block's
attention and experts) counted in `block_count` and announced by `nextn_predict_layers`.
The vocabulary (tokenizer and chat template) is copied from a reference GGUF, SmolLM2's by
default, so the model reads and writes the same tokens as the bundled model.

Weights are small and random (seeded): the text means nothing and the MTP head guesses the
trunk's next token only now and then.

    python scripts/make_test_mtp.py OUT.gguf [--vocab-from SmolLM2.gguf] [--seed 0]
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass

import numpy as np
from gguf import GGUFReader, GGUFValueType, GGUFWriter

ARCH = "glm4moe"


@dataclass(frozen=True)
class MtpOptions:
    n_embd: int = 64
    heads: int = 4
    heads_kv: int = 2
    head_dim: int = 16
    ffn: int = 128  # the dense layer's
    expert_ffn: int = 32
    experts: int = 4
    experts_used: int = 2
    layers: int = 2  # trunk blocks; one NextN block follows
    context: int = 4096
    seed: int = 0


def _copy_vocabulary(w: GGUFWriter, path: str) -> int:
    """Copy the tokenizer.* keys of the GGUF at `path`; returns its vocabulary size."""
    reader = GGUFReader(path)
    n_vocab = 0
    for name, f in reader.fields.items():
        if not name.startswith("tokenizer."):
            continue
        kind = f.types[0]
        if kind == GGUFValueType.ARRAY:
            sub = f.types[-1]
            if sub == GGUFValueType.STRING:
                values: list[object] = [bytes(f.parts[i]).decode("utf-8", "surrogateescape")
                                        for i in f.data]
            else:
                values = [f.parts[i].tolist()[0] for i in f.data]
            w.add_array(name, values)
            if name == "tokenizer.ggml.tokens":
                n_vocab = len(values)
        elif kind == GGUFValueType.STRING:
            w.add_string(name, bytes(f.parts[f.data[0]]).decode("utf-8"))
        else:
            w.add_key_value(name, f.parts[f.data[0]].tolist()[0], kind)
    if not n_vocab:
        raise ValueError(f"{path} has no tokenizer.ggml.tokens")
    return n_vocab


def make_mtp_model(out_path: str, vocab_from: str, options: MtpOptions = MtpOptions()) -> None:
    o = options
    rng = np.random.default_rng(o.seed)
    w = GGUFWriter(out_path, ARCH)
    w.add_string("general.name", "lmserve test MTP model (random)")
    w.add_description("random weights for plumbing tests; not a trained model")
    n_vocab = _copy_vocabulary(w, vocab_from)
    a = ARCH
    w.add_uint32(f"{a}.block_count", o.layers + 1)
    w.add_uint32(f"{a}.nextn_predict_layers", 1)
    w.add_uint32(f"{a}.context_length", o.context)
    w.add_uint32(f"{a}.embedding_length", o.n_embd)
    w.add_uint32(f"{a}.feed_forward_length", o.ffn)
    w.add_uint32(f"{a}.expert_feed_forward_length", o.expert_ffn)
    w.add_uint32(f"{a}.attention.head_count", o.heads)
    w.add_uint32(f"{a}.attention.head_count_kv", o.heads_kv)
    w.add_uint32(f"{a}.attention.key_length", o.head_dim)
    w.add_uint32(f"{a}.attention.value_length", o.head_dim)
    w.add_uint32(f"{a}.rope.dimension_count", o.head_dim)
    w.add_float32(f"{a}.rope.freq_base", 10000.0)
    w.add_float32(f"{a}.attention.layer_norm_rms_epsilon", 1e-5)
    w.add_uint32(f"{a}.expert_count", o.experts)
    w.add_uint32(f"{a}.expert_used_count", o.experts_used)
    w.add_uint32(f"{a}.expert_shared_count", 1)
    w.add_uint32(f"{a}.leading_dense_block_count", 1)
    w.add_float32(f"{a}.expert_weights_scale", 1.0)
    w.add_bool(f"{a}.expert_weights_norm", True)
    w.add_uint32(f"{a}.expert_gating_func", 2)  # sigmoid

    def tensor(name: str, *shape: int, std: float = 0.0, fill: float = 0.0) -> None:
        # numpy shape is ggml's ne reversed: a linear layer is [n_out, n_in]
        data = (rng.normal(0.0, std, shape) if std else np.full(shape, fill)).astype(np.float32)
        w.add_tensor(name, data)

    e, hd = o.n_embd, o.head_dim
    std = 1.0 / np.sqrt(e)
    tensor("token_embd.weight", n_vocab, e, std=1.0)
    tensor("output_norm.weight", e, fill=1.0)
    tensor("output.weight", n_vocab, e, std=std)
    for i in range(o.layers + 1):
        b = f"blk.{i}"
        tensor(f"{b}.attn_norm.weight", e, fill=1.0)
        tensor(f"{b}.attn_q.weight", o.heads * hd, e, std=std)
        tensor(f"{b}.attn_k.weight", o.heads_kv * hd, e, std=std)
        tensor(f"{b}.attn_v.weight", o.heads_kv * hd, e, std=std)
        tensor(f"{b}.attn_output.weight", e, o.heads * hd, std=std)
        tensor(f"{b}.post_attention_norm.weight", e, fill=1.0)
        if i == 0:
            tensor(f"{b}.ffn_gate.weight", o.ffn, e, std=std)
            tensor(f"{b}.ffn_up.weight", o.ffn, e, std=std)
            tensor(f"{b}.ffn_down.weight", e, o.ffn, std=1.0 / np.sqrt(o.ffn))
        else:
            f = o.expert_ffn
            tensor(f"{b}.ffn_gate_inp.weight", o.experts, e, std=std)
            tensor(f"{b}.exp_probs_b.bias", o.experts, fill=0.0)
            tensor(f"{b}.ffn_gate_exps.weight", o.experts, f, e, std=std)
            tensor(f"{b}.ffn_up_exps.weight", o.experts, f, e, std=std)
            tensor(f"{b}.ffn_down_exps.weight", o.experts, e, f, std=1.0 / np.sqrt(f))
            tensor(f"{b}.ffn_gate_shexp.weight", f, e, std=std)
            tensor(f"{b}.ffn_up_shexp.weight", f, e, std=std)
            tensor(f"{b}.ffn_down_shexp.weight", e, f, std=1.0 / np.sqrt(f))
        if i == o.layers:  # the NextN block
            tensor(f"{b}.nextn.eh_proj.weight", e, 2 * e, std=1.0 / np.sqrt(2 * e))
            tensor(f"{b}.nextn.enorm.weight", e, fill=1.0)
            tensor(f"{b}.nextn.hnorm.weight", e, fill=1.0)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out")
    parser.add_argument("--vocab-from", help="GGUF whose tokenizer to copy (default: the "
                        "bundled SmolLM2)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    vocab_from = args.vocab_from
    if vocab_from is None:
        from lmserve.models.resolve import resolve

        vocab_from = resolve("smollm2").path
    make_mtp_model(args.out, vocab_from, MtpOptions(seed=args.seed))
    return 0


if __name__ == "__main__":
    sys.exit(main())
