"""Language-model activations: load a model, hook a site, tokenize a text source, write shards to disk.

Everything here imports `transformers` lazily, so `saekit` itself works without it (`pip install 'saekit[lm]'`).
"""
