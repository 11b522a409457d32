"""The controller: request state, scheduling (through a pure policy), micro-batch dispatch."""
