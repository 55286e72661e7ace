#!/usr/bin/env python3
# Copyright 2026 The virtio-balloon maintainers.
# SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
"""Coverage gate: compare cargo llvm-cov's line coverage with coverage_config_<arch>.json.

Usage: check_coverage.py COVERAGE_JSON CONFIG_JSON

Fails when the measured line coverage is more than MAX_DELTA points below the recorded
`coverage_score`. When it is more than MAX_DELTA above, it passes and asks for the recorded
score to be raised, so the file keeps the real figure.
"""

import json
import sys

MAX_DELTA = 0.5


def main() -> int:
    coverage_path, config_path = sys.argv[1], sys.argv[2]
    with open(coverage_path) as f:
        totals = json.load(f)["data"][0]["totals"]["lines"]
    with open(config_path) as f:
        recorded = float(json.load(f)["coverage_score"])
    measured = round(totals["percent"], 2)
    print(
        f"line coverage {measured:.2f}% ({totals['covered']}/{totals['count']} lines), "
        f"recorded {recorded:.2f}%"
    )
    if measured < recorded - MAX_DELTA:
        print(f"FAIL: coverage dropped more than {MAX_DELTA} points below {config_path}")
        return 1
    if measured > recorded + MAX_DELTA:
        print(f"coverage rose: set coverage_score to {measured:.2f} in {config_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
