"""The KV layout rule: split streams when asked, or under auto when they fit an eighth of the
machine's memory; one shared pool otherwise."""

from __future__ import annotations

import pytest

from lmserve.engine import kv_layout

GIB = 1 << 30
SMOLLM2 = {"general.architecture": "llama", "llama.block_count": "30",
           "llama.embedding_length": "576", "llama.attention.head_count": "9",
           "llama.attention.head_count_kv": "3"}  # strings, as llama.cpp's metadata API gives


def test_bytes_per_token_from_the_header():
    assert kv_layout.bytes_per_token_from_metadata(SMOLLM2) == 30 * 3 * (64 + 64) * 2 == 23040
    gemma = {"general.architecture": "gemma3", "gemma3.block_count": 18,
             "gemma3.embedding_length": 640, "gemma3.attention.head_count": 4,
             "gemma3.attention.head_count_kv": 1, "gemma3.attention.key_length": 256,
             "gemma3.attention.value_length": 256}
    assert kv_layout.bytes_per_token_from_metadata(gemma) == 18 * 1 * 512 * 2
    no_kv_heads = {k: v for k, v in SMOLLM2.items() if not k.endswith("head_count_kv")}
    assert kv_layout.bytes_per_token_from_metadata(no_kv_heads) == 30 * 9 * 128 * 2
    per_layer = {**SMOLLM2, "llama.attention.head_count_kv": "[3, 3, 0]"}
    assert kv_layout.bytes_per_token_from_metadata(per_layer) is None
    assert kv_layout.bytes_per_token_from_metadata({"general.architecture": "x"}) is None
    assert kv_layout.bytes_per_token_from_metadata({}) is None


def test_auto_splits_what_fits_an_eighth_of_memory():
    # SmolLM2 at its default 8192 cells, 16 slots: 2.81 GiB
    fits = kv_layout.choose("auto", bytes_per_token=23040, n_ctx=8192, n_slots=16,
                            memory=24 * GIB)
    assert fits.split and "2.81 GiB" in fits.reason and "within 1/8 of 24.0 GiB" in fits.reason
    laptop = kv_layout.choose("auto", bytes_per_token=23040, n_ctx=8192, n_slots=16,
                              memory=16 * GIB)
    assert not laptop.split and "more than 1/8 of 16.0 GiB" in laptop.reason
    # an 8B model (128 KiB a cell) at 8192 cells would need 16 GiB split: shared
    big = kv_layout.choose("auto", bytes_per_token=131072, n_ctx=8192, n_slots=16,
                           memory=64 * GIB)
    assert not big.split and "16.00 GiB" in big.reason
    edge = 23040 * 8192 * 16
    assert kv_layout.choose("auto", bytes_per_token=23040, n_ctx=8192, n_slots=16,
                            memory=8 * edge).split
    assert not kv_layout.choose("auto", bytes_per_token=23040, n_ctx=8192, n_slots=16,
                                memory=8 * edge - 8).split


def test_auto_shares_when_it_cannot_size_and_explicit_settings_win():
    for unknown in ({"bytes_per_token": None, "memory": 24 * GIB},
                    {"bytes_per_token": 23040, "memory": None}):
        layout = kv_layout.choose("auto", n_ctx=2048, n_slots=8, **unknown)
        assert not layout.split and "could not size" in layout.reason
    split = kv_layout.choose("split", bytes_per_token=None, n_ctx=8192, n_slots=16, memory=GIB)
    assert split.split and "--kv-layout split" in split.reason
    shared = kv_layout.choose("shared", bytes_per_token=1, n_ctx=64, n_slots=2, memory=64 * GIB)
    assert not shared.split and "--kv-layout shared" in shared.reason
    with pytest.raises(ValueError, match="kv_layout must be one of"):
        kv_layout.choose("both", bytes_per_token=1, n_ctx=64, n_slots=2, memory=GIB)


def test_machine_memory_is_read():
    memory = kv_layout.machine_memory()
    assert memory is not None and memory > 256 << 20
