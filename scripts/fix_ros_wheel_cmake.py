"""Point the ROS wheels' exported CMake files at this interpreter's include directories.

The ros-* wheels are built in a manylinux container and their *Export.cmake files name that
container's Python and numpy include paths; CMake refuses imported targets whose include
directories do not exist, so building tf2_msgs fails until they are rewritten. Idempotent.
"""
import pathlib
import re
import sys
import sysconfig

import numpy

PY_INCLUDE = re.compile(r"/opt/python/cp3\d+-cp3\d+/include/python3\.\d+")
NUMPY_INCLUDE = re.compile(r"/opt/python/cp3\d+-cp3\d+/lib/python3\.\d+/site-packages/numpy/_core/include")


def main() -> int:
    share = pathlib.Path(sys.prefix) / "share"
    patched = 0
    for cmake_file in share.glob("*/cmake/*Export.cmake"):
        text = cmake_file.read_text()
        new = NUMPY_INCLUDE.sub(numpy.get_include(), text)
        new = PY_INCLUDE.sub(sysconfig.get_paths()["include"], new)
        if new != text:
            cmake_file.write_text(new)
            patched += 1
    print(f"fix_ros_wheel_cmake: patched {patched} files under {share}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
