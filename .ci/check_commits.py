#!/usr/bin/env python3
# Copyright 2026 The virtio-balloon maintainers.
# SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
"""Commit format check in rust-vmm's style, over every non-merge commit on HEAD.

Each commit needs a title of at most 60 characters, an empty second line, a body, and a
Signed-off-by line.
"""

import subprocess
import sys

TITLE_MAX = 60


def main() -> int:
    shas = subprocess.run(
        ["git", "rev-list", "--no-merges", "HEAD"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.split()
    bad = 0
    for sha in shas:
        message = subprocess.run(
            ["git", "log", "-1", "--format=%B", sha],
            check=True,
            capture_output=True,
            text=True,
        ).stdout.rstrip("\n")
        lines = message.split("\n")
        title = lines[0]
        problems = []
        if len(title) > TITLE_MAX:
            problems.append(f"title longer than {TITLE_MAX} characters")
        if len(lines) < 3 or lines[1] != "":
            problems.append("needs an empty second line and a body")
        if not any(line.startswith("Signed-off-by: ") for line in lines):
            problems.append("no Signed-off-by line")
        for problem in problems:
            print(f"{sha[:12]} {title!r}: {problem}")
            bad += 1
    print(f"checked {len(shas)} commits")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
