"""Bit packing of quantization codes.

A b-bit quantized weight matrix is stored as a dense little-endian bit stream so that its size on
disk (and the bits-per-weight we report) is exactly ``b`` bits per code, not one byte per code.
The stream is the simplest one that is unambiguous for every width 1..8:

* code ``i`` occupies stream bits ``[i*b, (i+1)*b)``, least significant bit first;
* stream bit ``j`` is bit ``j % 8`` of byte ``j // 8`` (LSB-first within each byte);
* the last byte is zero-padded, so the result has exactly ``ceil(numel*b/8)`` bytes.

For example codes ``[1, 2, 3]`` at 2 bits pack to the single byte ``0b00_11_10_01 == 57``.

A matrix of codes is put in the stream in *row tiles* (:func:`pack_tiled`): rows are padded with
zero codes to a multiple of ``TILE_ROWS`` (8), and the stream holds tile after tile, within a tile
column after column, within a column the tile's 8 rows in order. So the 8 codes of one tile and
one column are exactly ``b`` consecutive bytes: a kernel reads them with one load and gives each
of 8 output rows its code (docs/format.md, "Codes"; docs/runtime.md).

Mixed precision stores the columns of a weight matrix permuted into bit-homogeneous groups; each
group is a tiled matrix of its own (:func:`pack_groups`), always a whole number of bytes.

Implementation: 8 consecutive b-bit codes form exactly ``b`` bytes, so codes are padded to a
multiple of 8, each group of 8 is combined into one ``8*b``-bit integer (a loop over the 8 code
positions) and that integer is split into ``b`` bytes (a loop over at most 8 byte positions).
Everything else is vectorised; the only large temporaries are one int64 per 8 codes.
"""

from __future__ import annotations

import torch

__all__ = [
    "TILE_ROWS",
    "pack_codes",
    "pack_groups",
    "pack_tiled",
    "packed_nbytes",
    "tiled_nbytes",
    "unpack_codes",
    "unpack_groups",
    "unpack_tiled",
]

TILE_ROWS = 8  # rows whose codes for one column are stored together


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


def tile_count(rows: int) -> int:
    """Row tiles of a matrix with ``rows`` rows (the last one padded)."""
    return -(-rows // TILE_ROWS)


def tiled_nbytes(rows: int, cols: int, bits: int) -> int:
    """Bytes of a ``[rows, cols]`` code matrix packed in row tiles: ``ceil(rows/8)*cols*bits``."""
    _check_bits(bits)
    _check_count(rows, "rows")
    _check_count(cols, "cols")
    return tile_count(rows) * cols * bits


def pack_tiled(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack a ``[rows, cols]`` code matrix in row tiles (see the module docstring)."""
    if codes.dim() != 2:
        raise ValueError(f"codes must be a [rows, cols] matrix, got shape {tuple(codes.shape)}")
    rows, cols = codes.shape
    tiles = tile_count(rows)
    padded = torch.zeros(tiles * TILE_ROWS, cols, dtype=codes.dtype, device=codes.device)
    padded[:rows] = codes
    order = padded.view(tiles, TILE_ROWS, cols).transpose(1, 2)  # tile, column, row in tile
    return pack_codes(order.reshape(-1), bits)


def unpack_tiled(
    packed: torch.Tensor, bits: int, rows: int, cols: int, tiles: tuple[int, int] | None = None
) -> torch.Tensor:
    """Inverse of :func:`pack_tiled`: the ``[rows, cols]`` uint8 code matrix.

    With ``tiles=(first, stop)``, only rows ``8*first`` up to ``min(8*stop, rows)``, read from
    their own bytes (a stripe of the matrix; ``packed`` is still the whole matrix).
    """
    first, stop = tiles if tiles is not None else (0, tile_count(rows))
    if not 0 <= first <= stop <= tile_count(rows):
        raise ValueError(f"tiles {first}..{stop} outside the {tile_count(rows)} of {rows} rows")
    need = tiled_nbytes(rows, cols, bits)
    flat = packed.reshape(-1)
    if flat.numel() < need:
        raise ValueError(f"packed has {flat.numel()} bytes but {rows}x{cols} codes need {need}")
    per_tile = cols * bits
    part = flat[first * per_tile : stop * per_tile]
    count = (stop - first) * TILE_ROWS * cols
    codes = unpack_codes(part, bits, count).view(stop - first, cols, TILE_ROWS).transpose(1, 2)
    return codes.reshape((stop - first) * TILE_ROWS, cols)[
        : min(stop * TILE_ROWS, rows) - first * TILE_ROWS
    ]


def pack_groups(codes_by_group: list[torch.Tensor], bits_by_group: list[int]) -> torch.Tensor:
    """Pack several ``[rows, n_g]`` code matrices, each at its own width, into one uint8 stream.

    Each group is packed with :func:`pack_tiled`, so the result has
    ``sum(tiled_nbytes(rows, n_g, b))`` bytes. The shapes are not stored; the caller keeps
    them (they follow from the matrix shape and the bit-group header).

    Raises:
        ValueError: if the two lists differ in length, or as :func:`pack_codes`.
    """
    if len(codes_by_group) != len(bits_by_group):
        raise ValueError(
            f"got {len(codes_by_group)} code groups but {len(bits_by_group)} bit widths"
        )
    if not codes_by_group:
        return torch.empty(0, dtype=torch.uint8)
    parts = [pack_tiled(c, b) for c, b in zip(codes_by_group, bits_by_group, strict=True)]
    return torch.cat(parts)


def group_byte_offsets(rows: int, bits_by_group: list[int], sizes: list[int]) -> list[int]:
    """Where each group's bytes start in the stream :func:`pack_groups` writes, plus the end."""
    offsets = [0]
    for bits, size in zip(bits_by_group, sizes, strict=True):
        offsets.append(offsets[-1] + tiled_nbytes(rows, size, bits))
    return offsets


def unpack_groups(
    packed: torch.Tensor, bits_by_group: list[int], rows: int, sizes: list[int]
) -> list[torch.Tensor]:
    """Inverse of :func:`pack_groups`: one ``[rows, n_g]`` uint8 code matrix per group.

    Unlike :func:`unpack_codes`, the stream must have exactly the expected total size: it is
    meant to be the whole output of :func:`pack_groups`, and a size mismatch means the widths
    or sizes do not match the ones used for packing.

    Raises:
        ValueError: if the lists differ in length or ``packed`` has the wrong number of bytes.
    """
    if len(bits_by_group) != len(sizes):
        raise ValueError(f"got {len(bits_by_group)} bit widths but {len(sizes)} group sizes")
    if packed.dtype != torch.uint8:
        raise TypeError(f"packed must be a uint8 tensor, got dtype {packed.dtype}")
    offsets = group_byte_offsets(rows, bits_by_group, sizes)
    flat = packed.reshape(-1)
    if flat.numel() != offsets[-1]:
        raise ValueError(
            f"packed has {flat.numel()} bytes but the groups need exactly {offsets[-1]}"
        )
    return [
        unpack_tiled(flat[offsets[g] : offsets[g + 1]], bits, rows, size)
        for g, (bits, size) in enumerate(zip(bits_by_group, sizes, strict=True))
    ]
