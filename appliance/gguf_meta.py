"""A GGUF file's metadata without its tokenizer: the header, the key/values and the tensor infos.

gguf.GGUFReader materialises every value, the 50k-260k-token vocabulary arrays included,
and maps every tensor's data: seconds per file. Sizing, model cards and warm-ups need a
few scalars and the tensors' sizes, so this walks the same layout (GGUF v2 and v3, either
byte order) over a read-only mmap, steps over long arrays keeping only their length, and
checks the tensors' data lies within the file. The `gguf` package supplies the constants.
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gguf.constants import GGML_QUANT_SIZES, GGUF_DEFAULT_ALIGNMENT, GGMLQuantizationType, GGUFValueType
from gguf.gguf_reader import READER_SUPPORTED_VERSIONS

MAGIC = b"GGUF"
GGML_MAX_DIMS = 4  # ggml.h's; llama.cpp refuses tensors with more
# Arrays up to this long are read as lists (per-layer head counts, languages); longer ones
# (vocabularies, merges, scores) only have their length recorded.
LISTED_ARRAY_MAX = 1024
SCALAR_FORMATS = {
    GGUFValueType.UINT8: "B", GGUFValueType.INT8: "b", GGUFValueType.UINT16: "H", GGUFValueType.INT16: "h",
    GGUFValueType.UINT32: "I", GGUFValueType.INT32: "i", GGUFValueType.FLOAT32: "f", GGUFValueType.BOOL: "?",
    GGUFValueType.UINT64: "Q", GGUFValueType.INT64: "q", GGUFValueType.FLOAT64: "d",
}


class GGUFError(ValueError):
    """Not a GGUF file, or a truncated or corrupt one."""


@dataclass(frozen=True)
class TensorInfo:
    name: str
    tensor_type: GGMLQuantizationType
    shape: tuple[int, ...]  # as stored: the innermost dimension first
    n_elements: int
    n_bytes: int
    data_offset: int  # from the start of the file


@dataclass(frozen=True)
class GGUFMetadata:
    fields: dict[str, Any]  # key -> value as GGUFReader's contents() gives it; arrays over LISTED_ARRAY_MAX left out
    array_lengths: dict[str, int]  # every array's element count, listed or not
    tensors: list[TensorInfo]


def read_metadata(path: str | Path) -> GGUFMetadata:
    """Raises GGUFError for a file that is not GGUF or is cut short, OSError if unreadable."""
    with open(path, "rb") as f:
        head = f.read(4)
        if head != MAGIC:
            raise GGUFError(f"not a GGUF file (it starts with {head!r}, not {MAGIC!r})")
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            try:
                return _Parser(buf).metadata()
            except struct.error:  # struct read past the end
                raise _truncated(buf) from None


def _truncated(buf: mmap.mmap) -> GGUFError:
    return GGUFError(f"the metadata runs past the end of the file ({len(buf)} bytes)")


class _Parser:
    def __init__(self, buf: mmap.mmap):
        self.buf, self.pos = buf, 4
        self.array_lengths: dict[str, int] = {}
        (version,) = struct.unpack_from("<I", buf, self.pos)
        self.order = ">" if version & 0xFFFF == 0 else "<"  # a big-endian file reads as 0x0N000000
        self.u32, self.u64 = struct.Struct(self.order + "I"), struct.Struct(self.order + "Q")
        self.scalars = {t: struct.Struct(self.order + f) for t, f in SCALAR_FORMATS.items()}
        version = self.read(self.u32)
        if version not in READER_SUPPORTED_VERSIONS:
            raise GGUFError(f"GGUF version {version} is not supported (only {READER_SUPPORTED_VERSIONS})")

    def read(self, fmt: struct.Struct) -> Any:
        (value,) = fmt.unpack_from(self.buf, self.pos)
        self.pos += fmt.size
        return value

    def advance(self, n: int) -> int:
        """Moves past n bytes; where they started."""
        start, self.pos = self.pos, self.pos + n
        if self.pos > len(self.buf):
            raise _truncated(self.buf)
        return start

    def string(self) -> str:
        n = self.read(self.u64)
        start = self.advance(n)
        try:
            return self.buf[start:self.pos].decode("utf-8")
        except UnicodeDecodeError:
            raise GGUFError(f"a string at byte {start} is not UTF-8") from None

    def value(self, vtype: int, key: str) -> Any:
        if vtype == GGUFValueType.STRING:
            return self.string()
        if vtype in self.scalars:
            return self.read(self.scalars[vtype])
        if vtype != GGUFValueType.ARRAY:
            raise GGUFError(f"key {key!r} has unknown value type {vtype}")
        itype, count = self.read(self.u32), self.read(self.u64)
        if itype == GGUFValueType.ARRAY:
            raise GGUFError(f"key {key!r} is an array of arrays (llama.cpp reads none)")
        self.array_lengths[key] = count
        if count <= LISTED_ARRAY_MAX:
            return [self.value(itype, key) for _ in range(count)]
        if itype == GGUFValueType.STRING:  # each string's length says where the next one starts
            unpack, buf, pos = self.u64.unpack_from, self.buf, self.pos
            for _ in range(count):
                pos += 8 + unpack(buf, pos)[0]
            self.advance(pos - self.pos)
        elif itype in self.scalars:
            self.advance(count * self.scalars[itype].size)
        else:
            raise GGUFError(f"key {key!r} is an array of unknown type {itype}")
        return None

    def tensor_info(self) -> tuple[str, tuple[int, ...], int, int]:
        name = self.string()
        n_dims = self.read(self.u32)
        if n_dims > GGML_MAX_DIMS:
            raise GGUFError(f"tensor {name!r} has {n_dims} dimensions (at most {GGML_MAX_DIMS})")
        shape = struct.unpack_from(f"{self.order}{n_dims}Q", self.buf, self.advance(8 * n_dims))
        return name, shape, self.read(self.u32), self.read(self.u64)

    def metadata(self) -> GGUFMetadata:
        tensor_count, kv_count = self.read(self.u64), self.read(self.u64)
        fields: dict[str, Any] = {}
        for _ in range(kv_count):
            key = self.string()
            if key in fields or key in self.array_lengths:
                raise GGUFError(f"duplicate key {key!r}")
            vtype = self.read(self.u32)
            value = self.value(vtype, key)
            if key == "general.alignment" and vtype != GGUFValueType.UINT32:
                raise GGUFError("general.alignment is not a uint32")
            if value is not None:
                fields[key] = value
        infos = [self.tensor_info() for _ in range(tensor_count)]
        alignment = fields.get("general.alignment", GGUF_DEFAULT_ALIGNMENT)
        if alignment == 0 or alignment & (alignment - 1):
            raise GGUFError(f"alignment {alignment} is not a power of two")
        data_start = -(-self.pos // alignment) * alignment
        tensors: dict[str, TensorInfo] = {}
        for name, shape, raw_type, offset in infos:
            if name in tensors:
                raise GGUFError(f"duplicate tensor {name!r}")
            try:
                tensor_type = GGMLQuantizationType(raw_type)
                block_size, type_size = GGML_QUANT_SIZES[tensor_type]
            except (ValueError, KeyError):
                raise GGUFError(f"tensor {name!r} has unknown type {raw_type}") from None
            n_elements = 1
            for dim in shape:
                n_elements *= dim
            n_bytes = n_elements * type_size // block_size
            end = data_start + offset + n_bytes
            if end > len(self.buf):
                raise GGUFError(f"tensor {name!r} ends at byte {end}, past the end of the file ({len(self.buf)} bytes)")
            tensors[name] = TensorInfo(name, tensor_type, shape, n_elements, n_bytes, data_start + offset)
        return GGUFMetadata(fields, self.array_lengths, list(tensors.values()))
