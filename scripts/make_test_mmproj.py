"""Write a tiny CLIP vision (or audio) projector (mmproj) GGUF with random weights: a test
fixture, not a trained model, in the way llama.cpp's own CI tests multimodal plumbing with
tiny random models.

The file is a LLaVA-style projector as llama.cpp's clip loader reads it (tools/mtmd/clip.cpp):
`general.architecture = clip`, `clip.has_vision_encoder`, `clip.projector_type = mlp`, the
`clip.vision.*` hyperparameters, a ViT (`v.patch_embd`, `v.position_embd`, `v.class_embd`,
`v.pre_ln`, `v.blk.N.{ln1,attn_q,attn_k,attn_v,attn_out,ln2,ffn_up,ffn_down}`, `v.post_ln`)
and the two-layer MLP projector `mm.0` / `mm.2`, whose output width is the language model's
embedding width (`--n-embd`, 576 for SmolLM2-135M). An image becomes
(image_size / patch_size)^2 embeddings: 16 by default.

With `--audio` it writes an audio projector instead: Ultravox's (`clip.projector_type =
ultravox`, `clip.has_audio_encoder`, the `clip.audio.*` hyperparameters), a Whisper-style
encoder (`a.conv1d.{1,2}`, `a.position_embd`, `a.blk.N.*`, `a.post_ln`) whose 1500 frames of a
30-second log-mel window are stacked `stack_factor` at a time and projected by
`mm.a.norm_pre`, `mm.a.mlp.1` (SwiGLU), `mm.a.norm_mid`, `mm.a.mlp.2` to the language model's
width. llama.cpp's mtmd pads a clip to whole 30-second windows, so a clip shorter than 30 s
becomes 1500 / stack_factor embeddings: 50 by default.

Weights are small and random (seeded), so different images (or clips) give different
embeddings and a different continuation; the answer means nothing.

    python scripts/make_test_mmproj.py OUT.gguf [--audio] [--n-embd 576] [--seed 0]
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass

import numpy as np
from gguf import GGUFWriter


@dataclass(frozen=True)
class ProjectorOptions:
    n_embd: int = 576  # the language model's embedding width (the projector's output)
    image_size: int = 32
    patch_size: int = 8
    hidden: int = 64  # the vision encoder's width
    ffn: int = 128
    heads: int = 4
    layers: int = 2  # llava drops the last layer: one is evaluated
    seed: int = 0
    scale: float = 0.5  # the output embeddings' RMS relative to 1


def make_mmproj(out_path: str, options: ProjectorOptions = ProjectorOptions()) -> int:
    """Write the projector; returns the number of image tokens one image becomes."""
    o = options
    rng = np.random.default_rng(o.seed)
    w = GGUFWriter(out_path, "clip")
    w.add_string("general.name", "lmserve test projector (random)")
    w.add_description("random weights for plumbing tests; not a trained model")
    w.add_bool("clip.has_vision_encoder", True)
    w.add_bool("clip.has_text_encoder", False)
    w.add_bool("clip.has_llava_projector", True)
    w.add_string("clip.projector_type", "mlp")
    w.add_bool("clip.use_gelu", True)
    w.add_uint32("clip.vision.image_size", o.image_size)
    w.add_uint32("clip.vision.patch_size", o.patch_size)
    w.add_uint32("clip.vision.embedding_length", o.hidden)
    w.add_uint32("clip.vision.feed_forward_length", o.ffn)
    w.add_uint32("clip.vision.projection_dim", o.n_embd)
    w.add_uint32("clip.vision.attention.head_count", o.heads)
    w.add_float32("clip.vision.attention.layer_norm_epsilon", 1e-5)
    w.add_uint32("clip.vision.block_count", o.layers)
    w.add_array("clip.vision.image_mean", [0.5, 0.5, 0.5])
    w.add_array("clip.vision.image_std", [0.5, 0.5, 0.5])

    def tensor(name: str, *shape: int, std: float = 0.0, fill: float = 0.0) -> None:
        # numpy shape is ggml's ne reversed: a linear layer is [n_out, n_in]
        data = (rng.normal(0.0, std, shape) if std else np.full(shape, fill)).astype(np.float32)
        w.add_tensor(name, data)

    n_patches = (o.image_size // o.patch_size) ** 2
    h = o.hidden
    tensor("v.patch_embd.weight", h, 3, o.patch_size, o.patch_size,
           std=1.0 / np.sqrt(3 * o.patch_size**2))
    tensor("v.class_embd", h, std=0.02)
    tensor("v.position_embd.weight", n_patches + 1, h, std=0.02)
    for prefix in ("v.pre_ln", "v.post_ln"):
        tensor(f"{prefix}.weight", h, fill=1.0)
        tensor(f"{prefix}.bias", h)
    for i in range(o.layers):
        b = f"v.blk.{i}"
        for norm in ("ln1", "ln2"):
            tensor(f"{b}.{norm}.weight", h, fill=1.0)
            tensor(f"{b}.{norm}.bias", h)
        for proj in ("attn_q", "attn_k", "attn_v", "attn_out"):
            tensor(f"{b}.{proj}.weight", h, h, std=1.0 / np.sqrt(h))
            tensor(f"{b}.{proj}.bias", h)
        tensor(f"{b}.ffn_up.weight", o.ffn, h, std=1.0 / np.sqrt(h))
        tensor(f"{b}.ffn_up.bias", o.ffn)
        tensor(f"{b}.ffn_down.weight", h, o.ffn, std=1.0 / np.sqrt(o.ffn))
        tensor(f"{b}.ffn_down.bias", h)
    tensor("mm.0.weight", o.n_embd, h, std=1.0 / np.sqrt(h))
    tensor("mm.0.bias", o.n_embd)
    tensor("mm.2.weight", o.n_embd, o.n_embd, std=o.scale * 2.0 / np.sqrt(o.n_embd))
    tensor("mm.2.bias", o.n_embd)

    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return n_patches


@dataclass(frozen=True)
class AudioProjectorOptions:
    n_embd: int = 576  # the language model's embedding width (the projector's output)
    n_mel: int = 32  # mel bins of the log-mel input
    hidden: int = 32  # the audio encoder's width
    ffn: int = 64
    heads: int = 2
    layers: int = 1
    stack_factor: int = 30  # encoder frames per output embedding (1500 / 30 = 50)
    proj_ffn: int = 64  # the projector's SwiGLU width
    seed: int = 0
    scale: float = 0.5  # the output embeddings' RMS relative to 1


N_FRAMES = 3000  # mel frames in mtmd's 30-second window (hop 160 at 16 kHz)


def make_audio_mmproj(out_path: str, options: AudioProjectorOptions = AudioProjectorOptions()
                      ) -> int:
    """Write an Ultravox-style audio projector; returns the number of embeddings each
    30-second window of a clip becomes."""
    o = options
    n_pos = N_FRAMES // 2  # the second convolution has stride 2
    if n_pos % o.stack_factor:
        raise ValueError(f"stack_factor must divide {n_pos}")
    rng = np.random.default_rng(o.seed)
    w = GGUFWriter(out_path, "clip")
    w.add_string("general.name", "lmserve test audio projector (random)")
    w.add_description("random weights for plumbing tests; not a trained model")
    w.add_bool("clip.has_vision_encoder", False)
    w.add_bool("clip.has_audio_encoder", True)
    w.add_string("clip.projector_type", "ultravox")
    w.add_uint32("clip.audio.num_mel_bins", o.n_mel)
    w.add_uint32("clip.audio.embedding_length", o.hidden)
    w.add_uint32("clip.audio.feed_forward_length", o.ffn)
    w.add_uint32("clip.audio.projection_dim", o.n_embd)
    w.add_uint32("clip.audio.attention.head_count", o.heads)
    w.add_float32("clip.audio.attention.layer_norm_epsilon", 1e-5)
    w.add_uint32("clip.audio.block_count", o.layers)
    w.add_uint32("clip.audio.projector.stack_factor", o.stack_factor)

    def tensor(name: str, *shape: int, std: float = 0.0, fill: float = 0.0) -> None:
        data = (rng.normal(0.0, std, shape) if std else np.full(shape, fill)).astype(np.float32)
        w.add_tensor(name, data)

    h, stacked = o.hidden, o.hidden * o.stack_factor
    # conv1d kernels: ggml's [kernel, in, out] is numpy's (out, in, kernel); biases (out, 1)
    tensor("a.conv1d.1.weight", h, o.n_mel, 3, std=1.0 / np.sqrt(3 * o.n_mel))
    tensor("a.conv1d.1.bias", h, 1, std=0.02)
    tensor("a.conv1d.2.weight", h, h, 3, std=1.0 / np.sqrt(3 * h))
    tensor("a.conv1d.2.bias", h, 1, std=0.02)
    tensor("a.position_embd.weight", n_pos, h, std=0.02)
    for i in range(o.layers):
        b = f"a.blk.{i}"
        for norm in ("ln1", "ln2"):
            tensor(f"{b}.{norm}.weight", h, fill=1.0)
            tensor(f"{b}.{norm}.bias", h)
        for proj in ("attn_q", "attn_k", "attn_v", "attn_out"):
            tensor(f"{b}.{proj}.weight", h, h, std=1.0 / np.sqrt(h))
            if proj != "attn_k":  # Whisper's key projection has no bias
                tensor(f"{b}.{proj}.bias", h)
        tensor(f"{b}.ffn_up.weight", o.ffn, h, std=1.0 / np.sqrt(h))
        tensor(f"{b}.ffn_up.bias", o.ffn)
        tensor(f"{b}.ffn_down.weight", h, o.ffn, std=1.0 / np.sqrt(o.ffn))
        tensor(f"{b}.ffn_down.bias", h)
    tensor("a.post_ln.weight", h, fill=1.0)
    tensor("a.post_ln.bias", h)
    tensor("mm.a.norm_pre.weight", stacked, fill=1.0)
    tensor("mm.a.mlp.1.weight", 2 * o.proj_ffn, stacked, std=1.0 / np.sqrt(stacked))
    tensor("mm.a.norm_mid.weight", o.proj_ffn, fill=1.0)
    tensor("mm.a.mlp.2.weight", o.n_embd, o.proj_ffn, std=o.scale / np.sqrt(o.proj_ffn))

    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return n_pos // o.stack_factor


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", help="where to write the projector (mmproj-*.gguf)")
    parser.add_argument("--audio", action="store_true",
                        help="an audio projector (Ultravox-style) instead of a vision one")
    parser.add_argument("--n-embd", type=int, default=ProjectorOptions.n_embd,
                        help="the language model's embedding width (576 for SmolLM2-135M)")
    parser.add_argument("--seed", type=int, default=ProjectorOptions.seed)
    args = parser.parse_args(argv)
    if args.audio:
        tokens = make_audio_mmproj(args.out, AudioProjectorOptions(n_embd=args.n_embd,
                                                                   seed=args.seed))
        print(f"wrote {args.out}: {tokens} audio tokens per 30 s of a clip, "
              f"width {args.n_embd}")
        return 0
    tokens = make_mmproj(args.out, ProjectorOptions(n_embd=args.n_embd, seed=args.seed))
    print(f"wrote {args.out}: {tokens} image tokens per image, width {args.n_embd}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
