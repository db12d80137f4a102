from glob import glob

from setuptools import find_packages, setup

PACKAGE = "ros2_stream4d"

setup(
    name=PACKAGE,
    version="0.1.0",
    packages=find_packages(include=[PACKAGE, f"{PACKAGE}.*"]),
    data_files=[
        ("share/ament_index/resource_index/packages", [f"resource/{PACKAGE}"]),
        (f"share/{PACKAGE}", ["package.xml"]),
        (f"share/{PACKAGE}/launch", glob("launch/*.launch.py")),
        (f"share/{PACKAGE}/config", glob("config/*")),
        (f"share/{PACKAGE}/model", glob("model/*.yaml") + glob("model/*.safetensors")),
    ],
    install_requires=["setuptools"],
    zip_safe=True,
    maintainer="ros2_stream4d maintainers",
    maintainer_email="maintainers@ros2-stream4d.invalid",
    description="Streaming visual-geometry transformer with a rolling KV cache for ROS 2 online mapping",
    license="Apache-2.0",
    tests_require=["pytest"],
    entry_points={
        "console_scripts": [
            "stream4d = ros2_stream4d.cli:main",
            "stream4d_node = ros2_stream4d.ros.node:main",
        ],
    },
)
