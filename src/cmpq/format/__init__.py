"""The checkpoint format: the one description of what cmpq stores.

This package is the contract the quantizer (which writes), the runtime (which
reads) and ``cmpq inspect`` share, so it imports none of them:

- :mod:`.spec` — file names, version, tensor names and dtypes;
- :mod:`.packing` — the bit stream codes are packed into;
- :mod:`.layer` — a quantized linear in memory and as stored tensors;
- :mod:`.cost` — the stored bits of a layer, planned and counted;
- :mod:`.description` — the JSON description and its checks;
- :mod:`.validate` — the checks of stored tensors before any module is built;
- :mod:`.checkpoint` — output directories, checked and written atomically.

docs/format.md describes the same format for people.
"""
