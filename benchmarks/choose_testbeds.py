"""Choose, per testbed, which balancing run of ``benchmarks/balanced_testbeds.sh train`` the experiments use.

Reads ``ROOT/coef*/<testbed>/training.json`` and prints one line per testbed: ``name path coefficient bar_met``.
Rule (fixed before the runs): the smallest balancing coefficient whose run meets the balance bar (per layer
MaxVio <= 0.5 and no expert below a quarter of the mean load, on held-out text of every domain); if none
meets it, the smallest coefficient, with ``bar_met`` False (and the comparison on it says so).

    python benchmarks/choose_testbeds.py testbeds
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def choose(root: Path) -> list[tuple[str, Path, float, bool]]:
    runs: dict[str, list[tuple[float, Path, bool]]] = {}
    for record_path in sorted(root.glob("coef*/*/training.json")):
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
    for name, path, coef, met in choose(root):
        print(name, path, coef, met)


if __name__ == "__main__":
    main()
