"""Shared fixtures. Tests build tiny models in code and download nothing."""

from __future__ import annotations

import ctypes
import os
import re
import resource

import pytest
import torch

# Two xdist workers on two cores: one thread each avoids oversubscription (and noisy timings).
if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)

# Commands invoked in-process print no progress lines (tests read their output); subprocess tests that
# need progress drop this from the environment they pass.
os.environ["XATTN_QUIET"] = "1"

# Every test must fit an 8 GB machine with two workers: verification runs are held to 768 MiB (set like a
# user's --verify-memory, see xattn/memory.py; a worker holds 500-750 MiB between tests, so a test that
# verifies at the budget stays well under the limit), and each test's peak RSS (its process and any child
# it waited for) is checked below against TEST_RSS_LIMIT.
os.environ.setdefault("XATTN_VERIFY_MEMORY", "768MiB")
TEST_RSS_LIMIT = int(os.environ.get("XATTN_TEST_RSS_LIMIT_MIB", "2048")) << 20


def _peak_rss() -> int | None:
    """This process's peak RSS since the last reset (Linux VmHWM), in bytes."""
    try:
        with open("/proc/self/status") as status:
            return int(re.search(r"VmHWM:\s+(\d+)", status.read()).group(1)) << 10
    except (OSError, AttributeError):
        return None


def _reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as refs:
            refs.write("5")   # resets VmHWM to the current RSS (Linux >= 4.0)
        return True
    except OSError:
        return False


def _children_peak() -> int:
    return resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss << 10


try:
    _MALLOC_TRIM = ctypes.CDLL("libc.so.6").malloc_trim
except (OSError, AttributeError):   # not glibc: nothing to trim
    _MALLOC_TRIM = None


def _release_freed_memory() -> None:
    """Hand memory earlier tests freed back to the OS, so a test is charged for what it holds, not for
    what glibc kept in its free lists after the tests before it on the same worker (that varied by
    350 MiB with the order pytest-xdist chose, and put a 4-channel model's test over the limit in CI).
    No gc.collect() here: with torch and onnx loaded it takes 0.2 s, a minute over the suite."""
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)


@pytest.hookimpl(hookwrapper=True, tryfirst=True)
def pytest_runtest_setup(item):
    # before any fixture of this test (session fixtures built for it included) allocates
    _release_freed_memory()
    item._xattn_rss = (_reset_peak_rss(), _children_peak())
    yield


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if call.when != "teardown" or not report.passed or not hasattr(item, "_xattn_rss"):
        return
    reset, children_before = item._xattn_rss
    marker = item.get_closest_marker("rss_limit_mib")
    limit = (marker.args[0] << 20) if marker else TEST_RSS_LIMIT
    peaks = []
    own = _peak_rss() if reset else None
    if own is not None and own > limit:
        peaks.append(f"the test process peaked at {own >> 20} MiB")
    children = _children_peak()
    if children > children_before and children > limit:
        peaks.append(f"a child process it ran peaked at {children >> 20} MiB")
    if peaks:
        report.outcome = "failed"
        report.longrepr = (f"{item.nodeid}: {'; '.join(peaks)}, over the test's limit of {limit >> 20} MiB "
                           "per test (XATTN_TEST_RSS_LIMIT_MIB): the suite must pass on an 8 GB machine")


@pytest.fixture(scope="session")
def small_attention_args():
    """A small cross-attention block with different query and key/value widths and two heads."""
    return {"in_channels": 8, "out_channels": 16, "num_heads": 2, "kv_channels": 6}


@pytest.fixture(scope="session")
def exported_small(tmp_path_factory, small_attention_args):
    """One verified export of the small block, shared by tests that only read it."""
    from exporter.onnx_export import export_onnx
    from xattn.registry import load_model

    path = tmp_path_factory.mktemp("export") / "small.onnx"
    model = load_model("cross-attention", model_args=small_attention_args)
    result = export_onnx(model, path)
    return model, result


@pytest.fixture(scope="session")
def exported_net(tmp_path_factory):
    """The default model exported once with default settings."""
    from exporter.onnx_export import export_onnx
    from xattn.registry import load_model

    path = tmp_path_factory.mktemp("net") / "model.onnx"
    model = load_model()
    return model, export_onnx(model, path)
