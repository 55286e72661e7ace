#!/usr/bin/env python3
# Copyright 2026 The virtio-balloon maintainers.
# SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
"""Print each benchmark's time as a ratio of its floor's, from criterion's saved estimates.

Run after `cargo bench`. In every criterion group, the benchmark whose name starts with
`floor` is the floor; every other benchmark in the group is divided by it (median against
median). A ratio of 1.0 means as fast as the floor; 2.0 means twice as slow. For
throughput-style floors (a rate, where higher is better) invert the figure yourself.
"""

import json
import pathlib
import sys


def median_ns(bench_dir: pathlib.Path) -> float:
    estimates = json.loads((bench_dir / "new" / "estimates.json").read_text())
    return estimates["median"]["point_estimate"]


def main() -> int:
    root = pathlib.Path(sys.argv[1] if len(sys.argv) > 1 else "target/criterion")
    if not root.is_dir():
        print(f"no criterion results under {root}: run `cargo bench` first", file=sys.stderr)
        return 1
    printed = False
    for group in sorted(p for p in root.iterdir() if p.is_dir() and p.name != "report"):
        benches = {
            b.name: median_ns(b)
            for b in group.iterdir()
            if (b / "new" / "estimates.json").is_file()
        }
        floors = [name for name in benches if name.startswith("floor")]
        if len(floors) != 1:
            continue
        floor = floors[0]
        print(f"{group.name}: floor {floor} {benches[floor] / 1e6:.3f} ms")
        for name, ns in sorted(benches.items()):
            if name != floor:
                print(f"  {name:32} {ns / 1e6:9.3f} ms  ratio {ns / benches[floor]:.2f}")
        printed = True
    return 0 if printed else 1


if __name__ == "__main__":
    sys.exit(main())
