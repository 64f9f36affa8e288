"""Weights: HF safetensors directories and hub ids, GGUF files, the model registry.

`load_model` lives in `condensate_jax.weights.registry`; GGUF reading in
`condensate_jax.weights.gguf` (imported lazily, only for .gguf sources).
"""
