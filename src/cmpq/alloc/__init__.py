"""Bit allocation: how many code bits each input channel of each linear gets.

- :mod:`.paper` — the CMPQ paper's rule (same average width in every layer,
  the extra bit to the loudest channels);
- :mod:`.rd` — rate-distortion allocation from measured per-channel distortions;
- :mod:`.budget` — the solver that lands the total stored bits just under a target;
- :mod:`.size` — a byte budget for the whole file turned into total bits per weight.

Plans are made from shapes, statistics and distortions only; the quantizer
(:mod:`cmpq.quant`) measures and applies them.
"""
