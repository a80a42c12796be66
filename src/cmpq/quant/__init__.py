"""Quantization: from full-precision linears to what the format stores.

- :mod:`.kmeans` — weighted 1-D k-means, the look-up-table fitter;
- :mod:`.tables` — one layer's tables and codes, and per-column distortions;
- :mod:`.outliers` — the two kinds of fp16 outliers;
- :mod:`.feedback` — GPTQ-style error feedback with look-up tables;
- :mod:`.rtn` — the round-to-nearest baseline;
- :mod:`.executor` — where the per-linear work runs (threads today);
- :mod:`.report` — what a run stored and cost;
- :mod:`.pipeline` — ``quantize(model, config)``: calibrate, allocate, quantize
  block by block.
"""
