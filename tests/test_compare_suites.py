"""bench/compare_suites.py's verdicts: medians over the rounds, new / base, and a flag
only past the threshold; a benchmark one build lacks is listed, not compared."""
import importlib.util
from pathlib import Path

spec = importlib.util.spec_from_file_location("compare_suites",
                                              Path(__file__).parent.parent / "bench" / "compare_suites.py")
compare_suites = importlib.util.module_from_spec(spec)
spec.loader.exec_module(compare_suites)


def test_medians_ratios_and_flags():
    runs = {"base": [{"a": 1.0, "b": 2.0, "gone": 1.0}, {"a": 3.0, "b": 2.0, "gone": 1.0}, {"a": 2.0, "b": 2.0}],
            "new": [{"a": 2.0, "b": 2.3, "c": 1.0}, {"a": 2.1, "b": 2.1}, {"a": 2.2, "b": 2.2}]}
    rows, regressions = compare_suites.compare(runs, threshold=0.10)
    by = {r["name"]: r for r in rows}
    assert by["a"]["new_over_base"] == 2.1 / 2.0 and not by["a"]["regressed"]  # 5%: within the threshold
    assert by["b"]["new_over_base"] == 2.2 / 2.0 and by["b"]["regressed"] is False  # exactly 10%: not past it
    assert by["c"] == {"name": "c", "missing": "base"} and by["gone"] == {"name": "gone", "missing": "new"}
    assert regressions == []
    rows, regressions = compare_suites.compare({"base": [{"a": 1.0}], "new": [{"a": 1.2}]}, threshold=0.10)
    assert regressions == ["a"] and rows[0]["regressed"]
