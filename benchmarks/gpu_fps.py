#!/usr/bin/env python3
"""Same as `stream4d bench gpu ...` (see docs/benchmarks.md); arguments are passed through.

    python benchmarks/gpu_fps.py --help
"""

from __future__ import annotations

import sys

from ros2_stream4d.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", "gpu", *sys.argv[1:]]))
