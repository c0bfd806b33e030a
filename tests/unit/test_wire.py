"""What travels: exact serialization and its byte count."""

from __future__ import annotations

import pytest

import torch

from fedfm import wire


def test_round_trip_preserves_order_values_dtypes():
    t = {"z.b": torch.arange(3, dtype=torch.float32), "a.w": torch.randn(2, 2).double(), "m": torch.tensor([1, 2])}
    out = wire.decode(wire.encode(t))
    assert list(out) == list(t)
    assert all(torch.equal(out[k], t[k]) and out[k].dtype == t[k].dtype for k in t)


def test_bytes_are_payload_plus_small_header():
    t = {"w": torch.zeros(1000, dtype=torch.float32)}
    n = len(wire.encode(t))
    assert 4000 < n < 4000 + 256


def test_hand_written_encoder_is_read_by_safetensors_bit_for_bit():
    """wire.encode writes safetensors by hand; the library's own reader is the reference."""
    import torch
    from safetensors.torch import load

    from fedfm import wire

    gen = torch.Generator().manual_seed(0)
    tensors = {
        "f64": torch.randn(3, 5, generator=gen, dtype=torch.float64),
        "f32": torch.randn(7, generator=gen),
        "bf16": torch.randn(4, 2, generator=gen).to(torch.bfloat16),
        "f16": torch.randn(2, 3, generator=gen).to(torch.float16),
        "i64": torch.randint(-2**40, 2**40, (6,), generator=gen),
        "i8": torch.randint(-128, 127, (5, 1), generator=gen, dtype=torch.int8),
        "u8": torch.randint(0, 255, (9,), generator=gen, dtype=torch.uint8),
        "bool": torch.rand(4, generator=gen) > 0.5,
        "scalar": torch.tensor(3.5),
        "empty": torch.zeros(0, 4),
        "strided": torch.arange(12.0).reshape(3, 4).t(),  # not contiguous
    }
    blob = wire.encode(tensors)
    back = load(wire.as_safetensors(blob))
    assert sorted(back) == sorted(tensors)
    for k, v in tensors.items():
        assert back[k].dtype == v.dtype and back[k].shape == v.shape
        assert torch.equal(back[k].view(-1).view(torch.uint8) if v.numel() else back[k], v.contiguous().view(-1).view(torch.uint8) if v.numel() else v), k
    assert list(wire.decode(blob)) == list(tensors)  # the sender's order survives
    # the size is the data plus a header: 8 bytes of length and the compressed JSON
    data = sum(v.numel() * v.element_size() for v in tensors.values())
    header = int.from_bytes(blob[:8], "little")
    assert len(blob) == 8 + header + data
    with pytest.raises(ValueError, match="complex64"):
        wire.encode({"z": torch.zeros(2, dtype=torch.complex64)})


@pytest.mark.parametrize("seed", range(5))
def test_encoded_size_equals_the_encoding_length(seed):
    import torch

    from fedfm import wire

    gen = torch.Generator().manual_seed(seed)
    dtypes = [torch.float32, torch.float64, torch.bfloat16, torch.int8, torch.int64, torch.bool, torch.uint8]
    tensors = {}
    for i in range(int(torch.randint(1, 12, (1,), generator=gen))):
        shape = tuple(int(s) for s in torch.randint(0, 5, (int(torch.randint(0, 4, (1,), generator=gen)),),
                                                    generator=gen))
        dtype = dtypes[int(torch.randint(len(dtypes), (1,), generator=gen))]
        name = f"base_model.layer.{i}.lora_{'AB'[i % 2]}.weight" * (1 + i % 3)
        tensors[name] = torch.zeros(shape, dtype=dtype)
    assert wire.encoded_size(tensors) == len(wire.encode(tensors))


def test_header_is_compressed_and_the_plain_form_is_standard_safetensors():
    """Many similar names (a quantized LoRA update): the header is zlib's size of the JSON the
    safetensors format would carry, several times smaller than that JSON."""
    import json
    import zlib

    names = [f"base_model.model.bert.encoder.layer.{i}.attention.self.{m}.lora_{f}.default.weight.{p}"
             for i in range(6) for m in ("query", "key", "value") for f in "AB" for p in ("q", "lo", "scale")]
    tensors = {n: torch.zeros(7, dtype=torch.uint8) for n in names}
    blob = wire.encode(tensors)
    plain = wire.as_safetensors(blob)
    n_plain = int.from_bytes(plain[:8], "little")
    text = plain[8:8 + n_plain].rstrip(b" ")
    assert json.loads(text)["__metadata__"]["order"] == ",".join(names)
    assert int.from_bytes(blob[:8], "little") == len(zlib.compress(text, 6))
    assert len(blob) - 7 * len(names) < n_plain / 5  # the compressed header is over 5x smaller
    assert wire.encoded_size(tensors) == len(blob)


def test_bad_bytes_are_refused_with_the_reason():
    blob = wire.encode({"w": torch.arange(4.0)})
    with pytest.raises(ValueError, match="at least 8 bytes"):
        wire.decode(blob[:5])
    with pytest.raises(ValueError, match="runs past"):
        wire.decode(blob[:12])
    with pytest.raises(ValueError, match="does not decompress"):
        wire.decode(blob[:8] + bytes(len(blob) - 8))
    import struct
    import zlib

    bomb = zlib.compress(b" " * (wire.MAX_HEADER + 10))
    with pytest.raises(ValueError, match="longer than"):
        wire.decode(struct.pack("<Q", len(bomb)) + bomb)


def test_stray_bytes_and_a_wrong_order_are_refused():
    import struct
    import zlib

    blob = wire.encode({"w": torch.arange(4.0)})
    n = int.from_bytes(blob[:8], "little")
    header = blob[8:8 + n] + b"xx"  # stray bytes after the compressed header's end
    with pytest.raises(ValueError, match="stray bytes"):
        wire.decode(struct.pack("<Q", len(header)) + header + blob[8 + n:])
    import json

    text = json.loads(zlib.decompress(blob[8:8 + n]))
    text["__metadata__"]["order"] = "w,v"
    bad = zlib.compress(json.dumps(text, separators=(",", ":")).encode())
    with pytest.raises(ValueError, match="order lists 2 names for 1 tensors"):
        wire.decode(struct.pack("<Q", len(bad)) + bad + blob[8 + n:])
    with pytest.raises(ValueError, match="at least 8 bytes"):
        wire.as_safetensors(b"abc")
