"""The ingress: client-facing ZeroMQ endpoint, tokenization, validation, streaming."""
