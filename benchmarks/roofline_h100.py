#!/usr/bin/env python3
"""Same as `stream4d bench roofline ...` (see docs/benchmarks.md); arguments are passed through.

    python benchmarks/roofline_h100.py --help
"""

from __future__ import annotations

import sys

from ros2_stream4d.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", "roofline", *sys.argv[1:]]))
