"""Models: where they come from and where their linears are.

- :mod:`.sources` — a model spec (alias, checkpoint directory, ``.gguf`` file,
  hub id) resolved to a loaded full-precision model, with the alias cache;
- :mod:`.graph` — the decoder blocks and linears of any loaded model;
- :mod:`.conventions` — BOS and context length.

cmpq outputs are loaded by :mod:`cmpq.runtime.checkpoint`; :func:`cmpq.load_model`
picks the right one.
"""
