"""Calibration: the text, and what the model's activations say about each channel.

- :mod:`.text` — the bundled corpora and user files, evaluation windows and
  calibration sampling;
- :mod:`.stats` — per-input-channel statistics (and ``XᵀX``) of a linear;
- :mod:`.looper` — the block looper: one decoder block's inputs in memory at a
  time, each block's linears measured and handed on to be quantized.
- :mod:`.gradients` — how much the loss cares about each linear's outputs (its
  gradient energy there), for the ``rd-fisher`` allocation.
"""
