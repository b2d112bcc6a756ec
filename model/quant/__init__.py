"""Quantized weights, so Qwen3-Omni runs on the GPUs people own (24, 32 and 48 GB cards).

Modules (import them directly; this package imports nothing heavy on its own):
  formats     `Scheme` (which quantization), `QuantWeight` (one quantized weight in the fixed
              in-memory layout the kernels read), round-to-nearest `quantize` (quantize at
              load) and the int4 packing helpers.
  compressed  reading checkpoints in compressed-tensors format as llm-compressor writes them
              (int4/int8 packed, int8, FP8 per channel and block-wise), per-expert Linears
              mapped onto transformers' fused 3-D expert tensors.
  kernels     the dequantising matmuls the fast decoder runs.

Nothing here imports compressed-tensors or llm-compressor: the tests check the reader and the
round-to-nearest against them, but the runtime needs neither.
"""
