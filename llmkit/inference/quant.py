"""Quantized linears for inference live in llmkit.quant (one mechanism for int8, int4 and NF4);
re-exported here for the inference package's callers."""

from ..quant import GROUP, SMALL_M, QuantLinear, fuse_projections, quantize  # noqa: F401
