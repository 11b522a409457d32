#!/usr/bin/env python
"""Merges cost profiles of one model on one machine, taken at different times, into one whose
every figure is the median over them (conveyor/profile/merge.py says why and how).

    .venv/bin/python scripts/merge_profiles.py OUT.json A.json B.json [C.json ...]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    from common.costmodel.profile import Profile
    from conveyor.profile.merge import merge_profiles

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("profiles", type=Path, nargs="+")
    args = ap.parse_args()
    merged = merge_profiles([Profile.read(p) for p in args.profiles])
    print(f"wrote {merged.save(args.out)}: {merged.notes}")


if __name__ == "__main__":
    main()
