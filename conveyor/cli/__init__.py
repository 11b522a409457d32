"""The `conveyor` command line (typer)."""
