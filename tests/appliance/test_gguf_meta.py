"""The metadata-only GGUF reader against gguf.GGUFReader, and how it and its callers fail
on files that are cut short or are not GGUF."""

from __future__ import annotations

import gguf
import numpy as np
import pytest

from appliance.config import ModelConfig
from appliance.errors import InstallError, ModelFileError
from appliance.gguf_meta import LISTED_ARRAY_MAX, GGUFError, read_metadata
from appliance.model_card import card_from_gguf
from appliance.planning.estimate import model_shape
from services.engines.warmup import embeds_only
from tests.conftest import default_gguf


def assert_same_as_gguf_reader(path):
    reader, meta = gguf.GGUFReader(path), read_metadata(path)
    keys = [key for key in reader.fields if not key.startswith("GGUF.")]  # the reader's pseudo-keys for the header
    assert set(keys) == set(meta.fields) | set(meta.array_lengths)
    for key in keys:
        field = reader.fields[key]
        if field.types[0] == gguf.GGUFValueType.ARRAY:
            assert meta.array_lengths[key] == len(field.data), key
            if len(field.data) > LISTED_ARRAY_MAX:
                assert key not in meta.fields
                continue
        value = field.contents()
        assert (meta.fields[key], type(meta.fields[key])) == (value, type(value)), key
    expected = [(t.name, t.tensor_type, tuple(t.shape.tolist()), int(t.n_elements), int(t.n_bytes), int(t.data_offset))
                for t in reader.tensors]
    assert [(t.name, t.tensor_type, t.shape, t.n_elements, t.n_bytes, t.data_offset) for t in meta.tensors] == expected
    return meta


def test_the_default_model_reads_as_gguf_reader_reads_it():
    meta = assert_same_as_gguf_reader(default_gguf())
    assert meta.fields["general.architecture"] == "llama" and meta.fields["llama.block_count"] == 30
    assert meta.array_lengths["tokenizer.ggml.tokens"] == 49152 and len(meta.tensors) == 272


@pytest.mark.parametrize("endianess", [gguf.GGUFEndian.LITTLE, gguf.GGUFEndian.BIG], ids=["little", "big"])
def test_short_arrays_are_listed_long_ones_counted_in_either_byte_order(tmp_path, endianess):
    path = tmp_path / "m.gguf"
    writer = gguf.GGUFWriter(str(path), "llama", endianess=endianess)
    writer.add_block_count(3)
    writer.add_head_count([8, 8, 4])  # per layer
    writer.add_causal_attention(False)
    writer.add_rope_freq_base(10000.5)
    writer.add_languages(["en", "fr"])
    writer.add_token_list([f"tok{i}" for i in range(LISTED_ARRAY_MAX + 1)])
    writer.add_token_scores([float(i) for i in range(3000)])
    writer.add_tensor("a", np.ones((3, 32), dtype=np.float32))
    writer.add_tensor("b", np.ones(7, dtype=np.float16))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    meta = assert_same_as_gguf_reader(path)
    assert meta.fields["llama.attention.head_count"] == [8, 8, 4] and meta.fields["llama.attention.causal"] is False
    assert meta.array_lengths["tokenizer.ggml.scores"] == 3000 and "tokenizer.ggml.scores" not in meta.fields
    assert [(t.shape, t.n_bytes) for t in meta.tensors] == [((32, 3), 384), ((7,), 14)]


@pytest.fixture(scope="module")
def truncations(tmp_path_factory):
    """The default model cut in its header, its vocabulary, its tensor infos and its last tensor."""
    data = default_gguf().read_bytes()
    infos = data.index(b"token_embd.weight") - 8  # the first tensor info: its name's length, then its name
    folder = tmp_path_factory.mktemp("cut")
    cuts = {}
    for where, size in [("header", 12), ("vocabulary", 1_000_000), ("tensor infos", infos + 12), ("data", len(data) - 1)]:
        cuts[where] = folder / f"{where}.gguf"
        cuts[where].write_bytes(data[:size])
    return cuts


@pytest.mark.parametrize("where, message", [
    ("header", "the metadata runs past the end of the file (12 bytes)"),
    ("vocabulary", "the metadata runs past the end of the file (1000000 bytes)"),
    ("tensor infos", "the metadata runs past the end of the file"),
    ("data", "past the end of the file"),
])
def test_a_truncated_file_is_a_clear_error(truncations, where, message):
    with pytest.raises(GGUFError, match=message.replace("(", r"\(").replace(")", r"\)")):
        read_metadata(truncations[where])


@pytest.mark.parametrize("content, message", [
    (b"", "not a GGUF file (it starts with b'', not b'GGUF')"),
    (b'{"architectures": ["BertModel"]}', "not a GGUF file (it starts with b'{\"ar', not b'GGUF')"),
    (b"GGUF" + (99).to_bytes(4, "little") + bytes(16), "GGUF version 99 is not supported"),
])
def test_a_file_that_is_not_gguf_is_a_clear_error(tmp_path, content, message):
    path = tmp_path / "m.gguf"
    path.write_bytes(content)
    with pytest.raises(GGUFError) as raised:
        read_metadata(path)
    assert str(raised.value).startswith(message)


def test_callers_report_a_truncated_file_as_they_did(truncations):
    path = truncations["vocabulary"]
    with pytest.raises(InstallError, match=r"not a readable GGUF file \(truncated or corrupt: the metadata runs past"):
        model_shape(path)
    with pytest.raises(ModelFileError, match=r"not a readable GGUF file \(truncated or corrupt: the metadata runs past"):
        card_from_gguf(path)
    assert embeds_only(ModelConfig(name="m", engine="llamacpp", path=str(path), embeddings=True)) is False
