"""The stage worker: one slice of the model's layers, its KV cache, and the link to its
neighbours in the pipeline."""
