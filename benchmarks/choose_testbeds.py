"""Choose, per testbed, which balancing run of ``benchmarks/balanced_testbeds.sh train`` the experiments use.

Reads ``ROOT/PATTERN`` (default ``coef*/*/training.json``; the solo stage's runs: ``solo-*/*/training.json``)
and prints one line per testbed: ``name path coefficient bar_met``.
Rule (fixed before the runs): the smallest balancing coefficient whose run meets the balance bar (per layer
MaxVio <= 0.5 and no expert below a quarter of the mean load, on held-out text of every domain); if none
meets it, the smallest coefficient, with ``bar_met`` False (and the comparison on it says so).

    python benchmarks/choose_testbeds.py testbeds ['solo-*/*/training.json']
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def choose(root: Path, pattern: str = "coef*/*/training.json") -> list[tuple[str, Path, float, bool]]:
    runs: dict[str, list[tuple[float, Path, bool]]] = {}
    for record_path in sorted(root.glob(pattern)):
        record = json.loads(record_path.read_text())
        coef = float(record["recipe"]["aux_coefficient"])
        runs.setdefault(record["testbed"], []).append((coef, record_path.parent, bool(record["balance"]["bar_met"])))
    chosen = []
    for name, options in sorted(runs.items()):
        options.sort()
        coef, path, met = next((o for o in options if o[2]), options[0])
        chosen.append((name, path, coef, met))
    return chosen


def main() -> None:
    root = Path(sys.argv[1] if len(sys.argv) > 1 else "testbeds")
    pattern = sys.argv[2] if len(sys.argv) > 2 else "coef*/*/training.json"
    for name, path, coef, met in choose(root, pattern):
        print(name, path, coef, met)


if __name__ == "__main__":
    main()
