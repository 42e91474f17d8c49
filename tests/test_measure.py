"""promptmatch.measure: timing statistics, memory readings and the child-process runner."""
import math
import sys

import pytest

from promptmatch import measure
from promptmatch.measure import MB, Timing, call_in_child, run_python, time_call, time_each, time_interleaved


def test_timing_statistics_leave_out_the_warm_up():
    t = Timing.from_samples([9.0, 8.0, 3.0, 1.0, 2.0, 4.0], warmup=2)
    assert t.samples == (3.0, 1.0, 2.0, 4.0) and t.warmup == 2 and len(t) == 4
    assert (t.median, t.min, t.max) == (2.5, 1.0, 4.0)
    assert t.median_ms == 2500.0
    empty = Timing.from_samples([1.0, 2.0], warmup=2)
    assert len(empty) == 0 and math.isnan(empty.median) and math.isnan(empty.min) and math.isnan(empty.max)


def test_time_each_calls_once_per_input_and_drops_the_warm_up():
    seen = []
    t = time_each(seen.append, [1, 2, 3, 4, 5], warmup=2)
    assert seen == [1, 2, 3, 4, 5]
    assert len(t) == 3 and t.warmup == 2 and all(s >= 0 for s in t.samples)


def test_time_call_runs_warm_up_and_repeats():
    calls = []
    t = time_call(lambda: calls.append(1), repeats=4, warmup=3)
    assert len(calls) == 7 and len(t) == 4


def test_time_interleaved_calls_every_function_once_per_round_in_order():
    order = []
    fns = {"a": lambda: order.append("a"), "b": lambda: order.append("b")}
    wrapped = []

    def progress(it):
        wrapped.append(True)
        return it

    out = time_interleaved(fns, rounds=3, warmup=1, progress=progress)
    assert order == ["a", "b"] * 4 and wrapped == [True]
    assert set(out) == {"a", "b"} and all(len(t) == 3 for t in out.values())


def test_sync_ignores_non_cuda_devices():
    import torch

    for device in (None, "cpu", torch.device("cpu")):
        measure.sync(device)
    measure.reset_cuda_peak(torch.device("cpu"))


def test_memory_readings_are_positive_and_consistent():
    assert measure.rss_bytes() > 10 * MB
    assert measure.peak_rss_bytes() >= measure.rss_bytes() // 2
    hw, source = measure.high_water_rss_bytes()
    assert hw > 0 and source in ("VmHWM", "ru_maxrss")


def _child_square(payload):
    return {"square": payload["x"] ** 2, "argv0": sys.argv[0]}


def _child_fails(payload):
    raise ValueError("refused on purpose")


def test_call_in_child_round_trips_json():
    res = call_in_child("test_measure:_child_square", {"x": 7}, env={"PYTHONPATH": str(_tests_dir())})
    assert res.ok and not res.timed_out, res.stderr[-2000:]
    assert res.value["square"] == 49


def test_call_in_child_reports_a_failure_with_its_stderr():
    res = call_in_child("test_measure:_child_fails", {}, env={"PYTHONPATH": str(_tests_dir())})
    assert not res.ok and res.returncode not in (0, None) and res.value is None
    assert "refused on purpose" in res.stderr


def test_run_python_times_out():
    res = run_python(["-c", "import time; time.sleep(30)"], timeout=1)
    assert res.timed_out and not res.ok and res.returncode is None


def test_call_in_child_refuses_a_malformed_target():
    with pytest.raises(ValueError, match="module:function"):
        call_in_child("no_colon", {})


def _tests_dir():
    from pathlib import Path

    return Path(__file__).resolve().parent


@pytest.mark.parametrize("n", [1, 2, 7, 10])
def test_median_is_numpys_to_the_bit(n):
    """Recorded figures were np.median / statistics.median before this module: same values."""
    import numpy as np

    from promptmatch.benchmark.common import step_time_median

    rng = np.random.default_rng(n)
    xs = [float(v) for v in rng.random(n) * 1e-2]
    assert Timing.from_samples(xs).median == float(np.median(xs))
    assert step_time_median(xs, 3) == float(np.median(xs[min(3, n - 1):]))
