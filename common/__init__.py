"""Code shared by several Conveyor processes: configuration, wire protocol, logging, model
execution and the pure scheduling policies."""
