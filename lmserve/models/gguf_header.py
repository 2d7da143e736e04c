"""Read a GGUF file's metadata header without loading weights (registration must be cheap).

Arrays (the tokenizer's vocabulary, merges, scores) are skipped, not decoded, so even a large
model's header reads in milliseconds.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass, field
from typing import Any, BinaryIO

_MAGIC = b"GGUF"
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?",
            10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9

# general.file_type -> the name people use for the quantization (llama_ftype values).
_FILE_TYPES = {0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 7: "Q8_0", 8: "Q5_0", 9: "Q5_1",
               10: "Q2_K", 11: "Q3_K_S", 12: "Q3_K_M", 13: "Q3_K_L", 14: "Q4_K_S",
               15: "Q4_K_M", 16: "Q5_K_S", 17: "Q5_K_M", 18: "Q6_K", 19: "IQ2_XXS",
               20: "IQ2_XS", 21: "Q2_K_S", 22: "IQ3_XS", 23: "IQ3_XXS", 24: "IQ1_S",
               25: "IQ4_NL", 26: "IQ3_S", 27: "IQ3_M", 28: "IQ2_S", 29: "IQ2_M", 30: "IQ4_XS",
               31: "IQ1_M", 32: "BF16", 36: "TQ1_0", 37: "TQ2_0", 38: "MXFP4"}


class GGUFError(ValueError):
    pass


@dataclass(frozen=True)
class GGUFHeader:
    path: str
    version: int
    tensor_count: int
    size_bytes: int
    metadata: dict[str, Any] = field(repr=False)  # scalars and strings; arrays as their length

    @property
    def architecture(self) -> str:
        return str(self.metadata.get("general.architecture", "unknown"))

    @property
    def name(self) -> str | None:
        value = self.metadata.get("general.name")
        return str(value) if value is not None else None

    @property
    def context_length(self) -> int | None:
        value = self.metadata.get(f"{self.architecture}.context_length")
        return int(value) if value is not None else None

    @property
    def chat_template(self) -> str | None:
        value = self.metadata.get("tokenizer.chat_template")
        return value if isinstance(value, str) else None

    @property
    def quantization(self) -> str | None:
        value = self.metadata.get("general.file_type")
        return _FILE_TYPES.get(int(value), f"type {value}") if value is not None else None

    @property
    def pooling_only(self) -> bool:
        """An embedding model (BERT-like encoders declare a pooling type and no causal mask)."""
        return self.metadata.get(f"{self.architecture}.attention.causal") is False


def read_header(path: str, *, check_data: bool = False) -> GGUFHeader:
    """The header's metadata. `check_data`: also read the tensor table and refuse a file too
    short for the tensors it declares (a truncated download or copy)."""
    try:
        with open(path, "rb") as f:
            if f.read(4) != _MAGIC:
                raise GGUFError(f"{path} is not a GGUF file")
            version, = _unpack(f, "<I")
            if version < 2:
                raise GGUFError(f"{path}: GGUF version {version} is too old")
            tensor_count, kv_count = _unpack(f, "<QQ")
            metadata = {}
            for _ in range(kv_count):
                key = _read_string(f)
                metadata[key] = _read_value(f, _unpack(f, "<I")[0])
            size = os.path.getsize(path)
            if check_data:
                needed = _data_end(f, tensor_count, int(metadata.get("general.alignment", 32)))
                if needed > size:
                    raise GGUFError(f"{path}: truncated: its tensors need {needed} bytes, the "
                                    f"file has {size}")
    except struct.error as exc:
        raise GGUFError(f"{path}: truncated GGUF header") from exc
    except UnicodeDecodeError as exc:
        raise GGUFError(f"{path}: corrupt GGUF header ({exc})") from exc
    return GGUFHeader(path=path, version=version, tensor_count=tensor_count,
                      size_bytes=size, metadata=metadata)


def _data_end(f: BinaryIO, tensor_count: int, alignment: int) -> int:
    """Where the last tensor's data ends: the tensor table (name, dims, type, offset), then
    the data section at the next multiple of the alignment."""
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

    end = 0
    for _ in range(tensor_count):
        _read_string(f)
        n_dims, = _unpack(f, "<I")
        dims = _unpack(f, f"<{n_dims}Q") if n_dims else ()
        kind, offset = _unpack(f, "<IQ")
        try:
            block, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(kind)]
        except (ValueError, KeyError):
            continue  # a type this table does not know: its size is not checked
        elements = 1
        for d in dims:
            elements *= d
        end = max(end, offset + elements // block * type_size)
    start = f.tell()
    alignment = max(alignment, 1)
    return -(-start // alignment) * alignment + end


def _unpack(f: BinaryIO, fmt: str) -> tuple[Any, ...]:
    size = struct.calcsize(fmt)
    data = f.read(size)
    if len(data) != size:
        raise struct.error("unexpected end of file")
    return struct.unpack(fmt, data)


def _read_string(f: BinaryIO) -> str:
    length, = _unpack(f, "<Q")
    data = f.read(length)
    if len(data) != length:
        raise struct.error("unexpected end of file")
    return data.decode("utf-8")


def _read_value(f: BinaryIO, kind: int) -> Any:
    if kind in _SCALARS:
        return _unpack(f, _SCALARS[kind])[0]
    if kind == _STRING:
        return _read_string(f)
    if kind == _ARRAY:
        item_kind, count = _unpack(f, "<IQ")
        _skip_array(f, item_kind, count)
        return count
    raise GGUFError(f"unknown GGUF value type {kind}")


def _skip_array(f: BinaryIO, kind: int, count: int) -> None:
    if kind in _SCALARS:
        f.seek(struct.calcsize(_SCALARS[kind]) * count, os.SEEK_CUR)
    elif kind == _STRING:
        for _ in range(count):
            length, = _unpack(f, "<Q")
            f.seek(length, os.SEEK_CUR)
    elif kind == _ARRAY:
        for _ in range(count):
            inner, n = _unpack(f, "<IQ")
            _skip_array(f, inner, n)
    else:
        raise GGUFError(f"unknown GGUF array type {kind}")
