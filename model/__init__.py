"""The model side of duplex-chat: load Qwen3-Omni and run it as a streaming conversation.

Modules (import them directly; this package imports nothing heavy on its own):
  engine      `StreamingConversation`: listen while the user speaks, speak from the first frames,
              cancel and truncate to what was heard; typed events out (`events`).
  protocol    `Conversation`, the contract talk, replay and the views rely on.
  listener    audio -> log-mel -> encoder windows -> audio embeddings, as generate() encodes them.
  streams     thinker and talker as growing-cache decoders; `fast` is their CUDA-graph path.
  vocoder     code2wav as a stateful stream, exact against one-piece decoding.
  graphs      `CapturedCall`, the one CUDA-graph capture helper (decoder stacks and vocoder).
  quant       quantized weights: formats, checkpoint reading, quantize at load, Triton kernels.
  sampling    per-stage token choice, as generate() makes it.
  reference   transformers' own generate() on a whole conversation: the engine's reference and
              `replay --stock`.
  loading, checkpoint, footprint   finding, checking, sizing and loading a checkpoint.
  tiny        tiny random checkpoints (two shapes) that behave like trained ones, for tests.
  bench       the benchmark's conversation and the full-size random-weights model.

Tensors stay here: nothing in this package knows of terminals, sockets or sound devices, and it
imports only `duplex_chat.config` and `duplex_chat.audio`.
"""
