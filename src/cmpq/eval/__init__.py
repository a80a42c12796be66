"""Evaluation of a (quantized) model: perplexity and generation."""
