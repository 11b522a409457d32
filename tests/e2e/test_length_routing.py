"""Length groups in a real deployment: two instances of one stage, `--routing length-groups
--groups 0-48:1,48-:1`: short prompts are served by instance 0 only, long ones by instance 1
only (each instance's stage steps, from `conveyor stats`, tell which computed), and the greedy
answers are what one instance gives."""

from __future__ import annotations

import pytest

SHORT = list(range(1000, 1010))  # 10 prompt tokens (+ at most 4 predicted): group 0
LONG = list(range(1000, 1080))   # 80: group 1


def steps(client) -> list[int]:
    """Steps each instance's stage has run (an instance that ran none has no entry yet)."""
    done = {s["instance"]: s["steps"] for s in client.stats()["stages"]}
    return [done.get(i, 0) for i in range(2)]


@pytest.mark.parametrize("deployment", [{
    "stages": 1, "instances": 2,
    "sets": ("deployment.routing=length-groups", "deployment.groups=0-48:1,48-:1")}],
    indirect=True)
def test_short_and_long_prompts_go_to_their_own_group(deployment):
    with deployment.client() as client:
        before = steps(client)
        short = [client.generate(prompt_token_ids=SHORT, max_tokens=4,
                                 temperature=0) for _ in range(3)]
        mid = steps(client)
        long = [client.generate(prompt_token_ids=LONG, max_tokens=4,
                                temperature=0) for _ in range(2)]
        after = steps(client)
    assert mid[0] > before[0] and mid[1] == before[1]  # short: instance 0 alone
    assert after[1] > mid[1] and after[0] == mid[0]    # long: instance 1 alone
    assert len({tuple(r.token_ids) for r in short}) == 1  # greedy: the same answer each time
    assert len({tuple(r.token_ids) for r in long}) == 1
    assert all(p.free_blocks == p.total_blocks for p in deployment.wait_kv_free())
