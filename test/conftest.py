"""Test-wide set-up: an isolated, loopback-only ROS 2 domain per test process, and fixtures for real DDS tests.

Tests that talk DDS are marked `ros`; they skip (with the reason) where rclpy is not importable.
"""

from __future__ import annotations

import os

import pytest
from ros_harness import RosProcess, configure_process_environment, rclpy_available

_RCLPY_OK, _RCLPY_REASON = rclpy_available()


def pytest_configure(config):
    # Before any test imports rclpy: rclpy.init() reads the domain and the DDS profile from the environment.
    domain = configure_process_environment()
    config._s4d_domain_id = domain


def pytest_report_header(config):
    return f"ROS_DOMAIN_ID={getattr(config, '_s4d_domain_id', '?')} (loopback only), rclpy: " \
           f"{'yes' if _RCLPY_OK else _RCLPY_REASON}"


def pytest_collection_modifyitems(config, items):
    if _RCLPY_OK:
        return
    skip = pytest.mark.skip(reason=_RCLPY_REASON)
    for item in items:
        if "ros" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def ros_domain_id(pytestconfig) -> int:
    return pytestconfig._s4d_domain_id


@pytest.fixture
def ros_node(request):
    """A node in its own rclpy context (initialised and shut down around the test)."""
    if not _RCLPY_OK:
        pytest.skip(_RCLPY_REASON)
    import rclpy
    context = rclpy.Context()
    rclpy.init(context=context)
    name = "test_" + "".join(c if c.isalnum() else "_" for c in request.node.name)[:50]
    node = rclpy.create_node(name, context=context)
    try:
        yield node
    finally:
        node.destroy_node()
        context.try_shutdown()


@pytest.fixture
def ros_process(request):
    """Factory: ros_process(cmd, name=None, env=None) starts a child in the test's ROS environment.

    Every child is stopped (SIGINT, then kill) after the test; its output is printed, which pytest shows when the
    test failed.
    """
    started: list[RosProcess] = []

    def start(cmd, name=None, env=None) -> RosProcess:
        process = RosProcess(cmd, name=name, env=env)
        started.append(process)
        return process

    yield start
    for process in started:
        process.stop()
        print(process.describe())
        process.close()


_EXIT_STATUS: list[int] = []


def pytest_sessionfinish(session, exitstatus):
    _EXIT_STATUS.append(int(exitstatus))


def pytest_unconfigure(config):
    """End the test process with pytest's own verdict. Open3D's C++ memory statistic, run by its static destructor
    after Python has finalised, turns any tensor still alive then (e.g. held by a daemon worker thread a test did not
    join) into exit status 1 with a leak report; that status is not a test result. Reproduced: a TSDF volume held by
    a sleeping daemon thread makes a plain script exit 1. The leak report stays visible in the log when it happens
    in a child process (nodes, the demo). Not under mutmut (docs/mutation.md): it runs pytest inside its own
    process and reads the result after pytest returns."""
    if _EXIT_STATUS and "MUTANT_UNDER_TEST" not in os.environ:
        import gc
        import sys

        gc.collect()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(_EXIT_STATUS[-1])
