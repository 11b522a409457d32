"""Conveyor: pipeline-parallel LLM serving. This package holds the user-facing parts: the client
SDK (`from conveyor import Client`) and the `conveyor` command line."""

from conveyor.client import (AsyncClient, Client, ConnectionFailed, ConveyorError,
                             GenerationResult, InvalidRequestError, RequestTimeout, ServerError)

__all__ = ["AsyncClient", "Client", "ConnectionFailed", "ConveyorError", "GenerationResult",
           "InvalidRequestError", "RequestTimeout", "ServerError"]
__version__ = "0.1.0"
