"""Bit packing of quantization codes.

A b-bit quantized weight matrix is stored as a dense little-endian bit stream so that its size on
disk (and the bits-per-weight we report) is exactly ``numel * b / 8`` bytes, not one byte per
code.  The layout is the simplest one that is unambiguous for every width 1..8:

* codes are flattened row-major;
* code ``i`` occupies stream bits ``[i*b, (i+1)*b)``, least significant bit first;
* stream bit ``j`` is bit ``j % 8`` of byte ``j // 8`` (LSB-first within each byte);
* the last byte is zero-padded, so the result has exactly ``ceil(numel*b/8)`` bytes.

For example codes ``[1, 2, 3]`` at 2 bits pack to the single byte ``0b00_11_10_01 == 57``.

Mixed precision stores the columns of a weight matrix permuted into bit-homogeneous groups; each
group is packed on its own and starts on a byte boundary (:func:`pack_groups`), which wastes at
most 7 bits per group but lets every group be decoded independently.

Implementation: 8 consecutive b-bit codes form exactly ``b`` bytes, so codes are padded to a
multiple of 8, each group of 8 is combined into one ``8*b``-bit integer (a loop over the 8 code
positions) and that integer is split into ``b`` bytes (a loop over at most 8 byte positions).
Everything else is vectorised; the only large temporaries are one int64 per 8 codes.
"""

from __future__ import annotations

import torch

__all__ = [
    "pack_codes",
    "pack_groups",
    "packed_nbytes",
    "unpack_codes",
    "unpack_groups",
]


def _check_bits(bits: int) -> None:
    if isinstance(bits, bool) or not isinstance(bits, int) or not 1 <= bits <= 8:
        raise ValueError(f"bits must be an int in 1..8, got {bits!r}")


def _check_count(count: int, name: str = "count") -> None:
    if isinstance(count, bool) or not isinstance(count, int) or count < 0:
        raise ValueError(f"{name} must be a non-negative int, got {count!r}")


def packed_nbytes(count: int, bits: int) -> int:
    """Number of bytes that ``count`` codes of width ``bits`` occupy: ``ceil(count*bits/8)``."""
    _check_bits(bits)
    _check_count(count)
    return (count * bits + 7) // 8


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack integer ``codes`` (any shape, values in ``[0, 2**bits)``) into a 1-D uint8 stream.

    The codes are flattened row-major and written LSB-first into a little-endian bit stream (see
    the module docstring); the result has exactly ``packed_nbytes(codes.numel(), bits)`` bytes and
    lives on ``codes``' device.

    Raises:
        TypeError: if ``codes`` is not an integer (or bool) tensor.
        ValueError: if ``bits`` is not in 1..8 or a code lies outside ``[0, 2**bits)``.
    """
    _check_bits(bits)
    if codes.dtype.is_floating_point or codes.dtype.is_complex:
        raise TypeError(f"codes must be an integer tensor, got dtype {codes.dtype}")
    flat = codes.reshape(-1)
    n = flat.numel()
    if n == 0:
        return torch.empty(0, dtype=torch.uint8, device=codes.device)
    if codes.dtype != torch.bool:
        lo, hi = int(flat.min()), int(flat.max())
        if lo < 0 or hi >= 1 << bits:
            raise ValueError(
                f"codes must lie in [0, {1 << bits}) for bits={bits}, got range [{lo}, {hi}]"
            )
    if bits == 8:
        return flat.to(torch.uint8).contiguous()

    groups = (n + 7) // 8
    padded = torch.zeros(groups * 8, dtype=torch.int64, device=codes.device)
    padded[:n] = flat
    padded = padded.view(groups, 8)
    # 8 codes of <= 7 bits -> at most 56 bits, so the int64 word never reaches the sign bit.
    word = padded[:, 0].clone()
    for i in range(1, 8):
        word |= padded[:, i] << (i * bits)
    out = torch.empty(groups, bits, dtype=torch.uint8, device=codes.device)
    for j in range(bits):
        out[:, j] = (word >> (8 * j)) & 0xFF
    return out.reshape(-1)[: packed_nbytes(n, bits)]


def unpack_codes(packed: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """Inverse of :func:`pack_codes`: decode the first ``count`` codes of a packed stream.

    ``packed`` is a uint8 tensor (flattened if not 1-D).  Bytes beyond the
    ``packed_nbytes(count, bits)`` needed are ignored, so a caller may pass a larger buffer.
    Returns a 1-D uint8 tensor of ``count`` codes (the caller reshapes it).

    Raises:
        TypeError: if ``packed`` is not uint8.
        ValueError: if ``bits`` is not in 1..8, ``count`` is negative, or ``packed`` holds fewer
            bytes than ``count`` codes need.
    """
    _check_bits(bits)
    _check_count(count)
    if packed.dtype != torch.uint8:
        raise TypeError(f"packed must be a uint8 tensor, got dtype {packed.dtype}")
    need = packed_nbytes(count, bits)
    flat = packed.reshape(-1)
    if flat.numel() < need:
        raise ValueError(
            f"packed has {flat.numel()} bytes but {count} codes of {bits} bits need {need}"
        )
    if count == 0:
        return torch.empty(0, dtype=torch.uint8, device=packed.device)
    if bits == 8:
        return flat[:count].clone()

    groups = (count + 7) // 8
    buf = torch.zeros(groups * bits, dtype=torch.int64, device=packed.device)
    buf[:need] = flat[:need]
    buf = buf.view(groups, bits)
    word = buf[:, 0].clone()
    for j in range(1, bits):
        word |= buf[:, j] << (8 * j)
    mask = (1 << bits) - 1
    out = torch.empty(groups, 8, dtype=torch.uint8, device=packed.device)
    for i in range(8):
        out[:, i] = (word >> (i * bits)) & mask
    return out.reshape(-1)[:count]


def pack_groups(codes_by_group: list[torch.Tensor], bits_by_group: list[int]) -> torch.Tensor:
    """Pack several groups of codes, each at its own width, into one uint8 stream.

    Each group is packed with :func:`pack_codes` (flattened row-major) and starts on a byte
    boundary, so the result has ``sum(packed_nbytes(g.numel(), b))`` bytes.  The counts are not
    stored; the caller keeps them (they follow from the matrix shape and the column permutation).

    Raises:
        ValueError: if the two lists differ in length, or as :func:`pack_codes`.
    """
    if len(codes_by_group) != len(bits_by_group):
        raise ValueError(
            f"got {len(codes_by_group)} code groups but {len(bits_by_group)} bit widths"
        )
    if not codes_by_group:
        return torch.empty(0, dtype=torch.uint8)
    parts = [pack_codes(c, b) for c, b in zip(codes_by_group, bits_by_group, strict=True)]
    return torch.cat(parts)


def unpack_groups(
    packed: torch.Tensor, bits_by_group: list[int], counts_by_group: list[int]
) -> list[torch.Tensor]:
    """Inverse of :func:`pack_groups`: a list of 1-D uint8 code tensors, one per group.

    Unlike :func:`unpack_codes`, the stream must have exactly the expected total size: it is
    meant to be the whole output of :func:`pack_groups`, and a size mismatch means the widths
    or counts do not match the ones used for packing.

    Raises:
        ValueError: if the lists differ in length or ``packed`` has the wrong number of bytes.
    """
    if len(bits_by_group) != len(counts_by_group):
        raise ValueError(f"got {len(bits_by_group)} bit widths but {len(counts_by_group)} counts")
    if packed.dtype != torch.uint8:
        raise TypeError(f"packed must be a uint8 tensor, got dtype {packed.dtype}")
    sizes = [packed_nbytes(c, b) for b, c in zip(bits_by_group, counts_by_group, strict=True)]
    flat = packed.reshape(-1)
    if flat.numel() != sum(sizes):
        raise ValueError(
            f"packed has {flat.numel()} bytes but the groups need exactly {sum(sizes)}"
        )
    out: list[torch.Tensor] = []
    offset = 0
    for bits, count, size in zip(bits_by_group, counts_by_group, sizes, strict=True):
        out.append(unpack_codes(flat[offset : offset + size], bits, count))
        offset += size
    return out
