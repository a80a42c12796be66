"""Tests for cmpq.packing: exact sizes, the documented bit layout, round trips, errors."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from cmpq.format.packing import (
    pack_codes,
    pack_groups,
    pack_tiled,
    packed_nbytes,
    tiled_nbytes,
    unpack_codes,
    unpack_groups,
    unpack_tiled,
)


def _reference_pack(codes: list[int], bits: int) -> list[int]:
    """Bit-by-bit pure-Python packer that spells out the documented layout."""
    out = [0] * ((len(codes) * bits + 7) // 8)
    for i, code in enumerate(codes):
        for b in range(bits):
            if code >> b & 1:
                pos = i * bits + b
                out[pos // 8] |= 1 << (pos % 8)
    return out


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("count", [0, 1, 7, 8, 9, 63, 1000, 4099])
def test_round_trip_every_width(bits: int, count: int) -> None:
    gen = torch.Generator().manual_seed(bits * 10_000 + count)
    codes = torch.randint(0, 1 << bits, (count,), generator=gen, dtype=torch.int64)
    packed = pack_codes(codes, bits)
    assert packed.dtype == torch.uint8 and packed.dim() == 1
    assert packed.numel() == packed_nbytes(count, bits) == math.ceil(count * bits / 8)
    out = unpack_codes(packed, bits, count)
    assert out.dtype == torch.uint8 and out.shape == (count,)
    assert torch.equal(out.long(), codes)


@pytest.mark.parametrize("bits", range(1, 9))
def test_matches_reference_layout(bits: int) -> None:
    gen = torch.Generator().manual_seed(bits)
    codes = torch.randint(0, 1 << bits, (37,), generator=gen)
    assert pack_codes(codes, bits).tolist() == _reference_pack(codes.tolist(), bits)


def test_hand_checked_examples() -> None:
    # 1 | 2<<2 | 3<<4 = 0b00_11_10_01
    assert pack_codes(torch.tensor([1, 2, 3]), 2).tolist() == [0b00111001] == [57]
    # 3 bits: 5 | 3<<3 | 7<<6 = 0b1_1101_1101 -> bytes 0xDD, 0x01
    assert pack_codes(torch.tensor([5, 3, 7]), 3).tolist() == [0xDD, 0x01]
    # 4 bits: low nibble first
    assert pack_codes(torch.tensor([0xA, 0x5, 0xF]), 4).tolist() == [0x5A, 0x0F]
    # 1 bit: LSB first within the byte
    assert pack_codes(torch.tensor([1, 0, 0, 0, 0, 0, 0, 1, 1]), 1).tolist() == [0x81, 0x01]
    assert pack_codes(torch.tensor([200, 7]), 8).tolist() == [200, 7]


def test_any_shape_flattens_row_major_and_any_int_dtype() -> None:
    codes = torch.arange(24).reshape(2, 3, 4) % 8
    flat = codes.reshape(-1)
    for dtype in (torch.uint8, torch.int16, torch.int32, torch.int64):
        assert torch.equal(pack_codes(codes.to(dtype), 3), pack_codes(flat, 3))
    # a transposed (non-contiguous) view packs in its own row-major order
    t = codes[0].t()
    assert torch.equal(unpack_codes(pack_codes(t, 3), 3, 12).long(), t.reshape(-1))
    assert torch.equal(pack_codes(torch.tensor([True, False, True]), 1), torch.tensor([5]).byte())


def test_unpack_ignores_extra_bytes() -> None:
    packed = torch.cat([pack_codes(torch.tensor([1, 2, 3]), 2), torch.tensor([255]).byte()])
    assert unpack_codes(packed, 2, 3).tolist() == [1, 2, 3]


def test_packed_nbytes() -> None:
    assert packed_nbytes(0, 3) == 0
    assert packed_nbytes(1, 1) == 1
    assert packed_nbytes(8, 1) == 1
    assert packed_nbytes(9, 1) == 2
    assert packed_nbytes(3, 3) == 2
    assert packed_nbytes(8, 3) == 3
    assert packed_nbytes(576 * 576, 5) == 576 * 576 * 5 // 8


@settings(max_examples=40, deadline=None)
@given(
    bits=st.integers(1, 8),
    data=st.data(),
)
def test_round_trip_property(bits: int, data: st.DataObject) -> None:
    codes = data.draw(st.lists(st.integers(0, (1 << bits) - 1), max_size=80))
    t = torch.tensor(codes, dtype=torch.int64)
    packed = pack_codes(t, bits)
    assert packed.tolist() == _reference_pack(codes, bits)
    assert unpack_codes(packed, bits, len(codes)).tolist() == codes


def test_groups_round_trip_mixed_widths() -> None:
    gen = torch.Generator().manual_seed(0)
    bits_by_group = [2, 3, 4, 8, 1, 5]
    rows, sizes = 13, [5, 3, 7, 1, 0, 9]  # 13 rows: the second tile is padded
    groups = [
        torch.randint(0, 1 << b, (rows, n), generator=gen)
        for b, n in zip(bits_by_group, sizes, strict=True)
    ]
    packed = pack_groups(groups, bits_by_group)
    assert (
        packed.numel()
        == sum(2 * n * b for n, b in zip(sizes, bits_by_group, strict=True))
        == sum(tiled_nbytes(rows, n, b) for n, b in zip(sizes, bits_by_group, strict=True))
    )
    # every group starts byte-aligned: its bytes equal packing it alone
    offset = 0
    for g, b in zip(groups, bits_by_group, strict=True):
        alone = pack_tiled(g, b)
        assert torch.equal(packed[offset : offset + alone.numel()], alone)
        offset += alone.numel()
    out = unpack_groups(packed, bits_by_group, rows, sizes)
    assert len(out) == len(groups)
    for o, g in zip(out, groups, strict=True):
        assert torch.equal(o.long(), g)
    assert pack_groups([], []).numel() == 0
    assert unpack_groups(torch.empty(0, dtype=torch.uint8), [], rows, []) == []


def test_tiled_layout_puts_a_tiles_column_in_b_bytes() -> None:
    # rows 0..7 of column 1 at 3 bits: codes 0..7 -> the 3 bytes of pack_codes(0..7)
    codes = torch.zeros(10, 2, dtype=torch.uint8)
    codes[:8, 1] = torch.arange(8)
    codes[8:, 0] = torch.tensor([5, 6])  # tile 1 (rows 8, 9 and 6 padding rows)
    packed = pack_tiled(codes, 3)
    assert packed.numel() == tiled_nbytes(10, 2, 3) == 2 * 2 * 3
    assert torch.equal(packed[0:3], torch.zeros(3, dtype=torch.uint8))
    assert torch.equal(packed[3:6], pack_codes(torch.arange(8), 3))
    assert torch.equal(packed[6:9], pack_codes(torch.tensor([5, 6, 0, 0, 0, 0, 0, 0]), 3))


@pytest.mark.parametrize("bits", [1, 3, 4, 7, 8])
def test_unpack_tiled_stripes(bits: int) -> None:
    gen = torch.Generator().manual_seed(bits)
    codes = torch.randint(0, 1 << bits, (21, 6), generator=gen, dtype=torch.uint8)
    packed = pack_tiled(codes, bits)
    for first, stop in [(0, 1), (1, 3), (2, 3), (0, 3), (3, 3)]:
        stripe = unpack_tiled(packed, bits, 21, 6, tiles=(first, stop))
        assert torch.equal(stripe, codes[8 * first : 8 * stop])
    with pytest.raises(ValueError, match="outside"):
        unpack_tiled(packed, bits, 21, 6, tiles=(2, 4))


@pytest.mark.parametrize("bits", [0, 9, -1, 2.0, True])
def test_bad_bits(bits: object) -> None:
    with pytest.raises(ValueError, match="bits"):
        pack_codes(torch.tensor([0]), bits)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="bits"):
        unpack_codes(torch.tensor([0], dtype=torch.uint8), bits, 1)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="bits"):
        packed_nbytes(1, bits)  # type: ignore[arg-type]


def test_codes_out_of_range() -> None:
    with pytest.raises(ValueError, match=r"\[0, 4\)"):
        pack_codes(torch.tensor([0, 4]), 2)
    with pytest.raises(ValueError, match="range"):
        pack_codes(torch.tensor([-1, 0]), 3)
    with pytest.raises(ValueError, match="range"):
        pack_codes(torch.tensor([256]), 8)
    with pytest.raises(ValueError, match="range"):
        pack_groups([torch.tensor([[1]]), torch.tensor([[2]])], [2, 1])


def test_wrong_dtypes() -> None:
    with pytest.raises(TypeError):
        pack_codes(torch.tensor([0.0, 1.0]), 2)
    with pytest.raises(TypeError):
        unpack_codes(torch.tensor([1], dtype=torch.int32), 2, 1)


def test_too_few_bytes_and_bad_counts() -> None:
    packed = pack_codes(torch.arange(9) % 8, 3)  # 27 bits -> 4 bytes
    with pytest.raises(ValueError, match="need 5"):
        unpack_codes(packed, 3, 11)
    with pytest.raises(ValueError, match="count"):
        unpack_codes(packed, 3, -1)
    with pytest.raises(ValueError, match="exactly"):
        unpack_groups(packed, [3], 8, [1])  # needs 3 bytes, got 4
    with pytest.raises(ValueError, match="exactly"):
        unpack_groups(packed, [3, 3], 8, [1, 1])
    with pytest.raises(ValueError, match="sizes"):
        unpack_groups(packed, [3], 8, [1, 1])
    with pytest.raises(ValueError, match="widths"):
        pack_groups([torch.tensor([1])], [2, 3])
