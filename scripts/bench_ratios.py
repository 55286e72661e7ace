#!/usr/bin/env python3
# Copyright 2026 The virtio-balloon maintainers.
# SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
"""Print each benchmark's time as a ratio of its floor's, from criterion's saved estimates.

Run after `cargo bench`. In every criterion group, the benchmark whose name starts with
`floor` is the floor; every other benchmark in the group is divided by it (median against
median). A ratio of 1.0 means as fast as the floor; 2.0 means twice as slow. For
throughput-style floors (a rate, where higher is better) invert the figure yourself.

Groups with a rate target (`RATE_TARGETS`) also get that benchmark's rate as a fraction of
the floor's rate (floor time / time, both measured over the same elements), its throughput
and whether it meets the target: for `hint_path`, the full device path must reach 0.7 of
the rate of bare `pop_descriptor_chain` + `add_used` (a time ratio of at most 1/0.7); for
`content_log`, a sync of the content-hash dirty log must reach 0.5 of the rate of a plain
read pass over the same memory; for `snapshot_writer`, a stopped snapshot must reach 0.8 of
the rate of a sequential write of the same bytes to the same file system.
"""

import json
import pathlib
import sys


# group -> (benchmark, the least fraction of the floor's rate it must reach).
RATE_TARGETS = {
    "hint_path": ("device_process_queue", 0.7),
    "content_log": ("sync", 0.5),
    "snapshot_writer": ("snapshot_stopped", 0.8),
}


def median_ns(bench_dir: pathlib.Path) -> float:
    estimates = json.loads((bench_dir / "new" / "estimates.json").read_text())
    return estimates["median"]["point_estimate"]


def throughput(bench_dir: pathlib.Path):
    """The throughput per iteration the benchmark declared, as (`"Elements"` or `"Bytes"`,
    count), if any."""
    try:
        meta = json.loads((bench_dir / "new" / "benchmark.json").read_text())
    except (OSError, ValueError):
        return None
    declared = meta.get("throughput") or {}
    for kind in ("Elements", "Bytes"):
        if declared.get(kind):
            return kind, declared[kind]
    return None


def print_rate(group: pathlib.Path, benches: dict, floor: str) -> None:
    name, target = RATE_TARGETS[group.name]
    if name not in benches:
        return
    rate = benches[floor] / benches[name]
    verdict = "meets" if rate >= target else "MISSES"
    declared = throughput(group / name)
    per_second = ""
    if declared and declared[0] == "Elements":
        per_second = f", {declared[1] / benches[name] * 1e3:.2f} Melem/s"
    elif declared:
        per_second = f", {declared[1] / benches[name] * 1e9 / 2**30:.2f} GiB/s"
    print(
        f"  rate of {name}: {rate:.2f} of the floor's{per_second}"
        f" ({verdict} the target {target:.2f}, time ratio <= {1 / target:.2f})"
    )


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
        if group.name in RATE_TARGETS:
            print_rate(group, benches, floor)
        printed = True
    return 0 if printed else 1


if __name__ == "__main__":
    sys.exit(main())
