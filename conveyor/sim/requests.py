"""A simulated request: the instance core's request plus where it truly ends (EOS), which
only the simulator knows; policies see its `max_tokens` cap and any prediction, never this."""

from __future__ import annotations

from common.instance.request import CoreRequest
from common.scheduling.types import SLO

SIM_EOS = -1
"""The token a simulated request samples at its true output length (ordinary tokens are 0)."""


class SimulationError(RuntimeError):
    """The simulation cannot go on (a worker died, a policy broke the core's rules)."""


class SimRequest(CoreRequest):
    __slots__ = ("index", "true_output")

    def __init__(self, rid: int, index: int, arrival: float, prompt: int, max_tokens: int,
                 true_output: int, max_context: int, ignore_eos: bool, slo: SLO | None = None):
        super().__init__(rid, arrival, prompt, max_tokens, max_context,
                         stop_token_ids=() if ignore_eos else (SIM_EOS,), slo=slo,
                         record_itl=True)
        self.index = index
        """Position in the workload."""
        self.true_output = true_output
        """Tokens it generates before EOS."""
