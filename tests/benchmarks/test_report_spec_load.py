"""benchmarks.report's subsection on speculation beside other requests: a row per load, and the headline."""

import random

from benchmarks.report import section, spec_load_headline, spec_load_lines


def _row(n: int) -> dict:
    full, always, rec = (random.uniform(50, 600) for _ in range(3))
    return {"requests": n, "switched_for_load": n if n > 3 else 0, "full_tokens_per_s": full, "always_tokens_per_s": always,
            "recommended_tokens_per_s": rec, "always_ratio_to_full": always / full, "recommended_ratio_to_full": rec / full}


def test_each_load_is_a_row_and_the_headline_takes_the_most_requests():
    loads = sorted(random.sample(range(1, 33), 5))
    info = {"load_sweep": [_row(n) for n in loads], "full_depth_above": 3, "new_tokens": 64, "repeats": 3, "threads": 1,
            "load_average_before": [0.5, 0.6, 0.7], "load_average_after": [0.9, 0.8, 0.7]}
    bench = {"name": "test_spec_load", "fullname": "benchmarks/test_spec_load.py::test_spec_load", "extra_info": info}
    others = [{"name": "test_other", "fullname": "benchmarks/test_x.py::test_other", "extra_info": {"x": 1}}, bench]
    lines = spec_load_lines(others)
    table = [line for line in lines if line.startswith("| ") and not line.startswith("| requests")]
    assert len(table) == len(loads)
    for line, r in zip(table, info["load_sweep"]):
        assert line == (f"| {r['requests']} | {r['full_tokens_per_s']:.1f} | {r['always_tokens_per_s']:.1f} | "
                        f"{r['always_ratio_to_full']:.2f} | {r['recommended_tokens_per_s']:.1f} | "
                        f"{r['recommended_ratio_to_full']:.2f} | {r['switched_for_load']} of {r['requests']} |")
    assert "0.5/0.6/0.7 -> 0.9/0.8/0.7" in " ".join(lines) and "`full_depth_above=3`" in " ".join(lines)
    top = info["load_sweep"][-1]
    head = spec_load_headline(others)
    assert head.startswith(f"at {loads[-1]} requests at once")
    assert f"**{top['always_ratio_to_full']:.2f}x**" in head and f"**{top['recommended_ratio_to_full']:.2f}x**" in head
    assert "full depth against itself" in head  # _row: every request above 3 switched
    few = {**bench, "extra_info": {**info, "load_sweep": [_row(1), _row(random.randint(2, 3))]}}
    assert "full depth against itself" not in spec_load_headline([few])
    assert spec_load_lines(others[:1]) == [] and spec_load_headline(others[:1]) is None


def test_a_run_renders_the_sweep_once_as_its_own_section(tmp_path):
    info = {"load_sweep": [_row(n) for n in (1, 4)], "full_depth_above": 3, "new_tokens": 64, "repeats": 3, "threads": 1,
            "load_average_before": [0.5, 0.6, 0.7], "load_average_after": [0.9, 0.8, 0.7]}
    bench = {"name": "test_spec_load", "fullname": "benchmarks/test_spec_load.py::test_spec_load", "extra_info": info,
             "stats": {"median": 0.001, "rounds": 1}}
    text = "\n".join(section(tmp_path / "results.json", {"benchmarks": [bench]}, tmp_path))
    assert text.count("### Speculation beside other requests (`test_spec_load.py`)") == 1
    assert "- **Speculation beside other requests** (`test_spec_load.py`): at 4 requests at once" in text
    assert "#### `benchmarks/test_spec_load.py`" not in text  # not again among the other benchmarks


def test_merged_files_say_whether_they_were_measured_again_or_kept_from_an_earlier_run(tmp_path):
    """looplm_reruns: a file rerun later replaces the run's rows; one left out of the run keeps an
    earlier run's rows, and the header says which commit measured each."""
    bench = {"name": "test_spec_load", "fullname": "benchmarks/test_spec_load.py::test_spec_load", "stats": {"median": 0.001, "rounds": 1},
             "extra_info": {"load_sweep": [_row(1)], "full_depth_above": 3, "new_tokens": 64, "repeats": 3, "threads": 1,
                            "load_average_before": [0.5, 0.6, 0.7], "load_average_after": [0.9, 0.8, 0.7]}}
    reruns = [{"file": "benchmarks/test_a.py", "commit": "abc1234", "date": "2026-12-02 08:00 UTC", "load_average": 0.5},
              {"file": "benchmarks/test_b.py", "commit": "def5678", "date": "2026-12-01 07:00 UTC", "load_average": 1.0, "kept": True}]
    text = "\n".join(section(tmp_path / "results.json", {"benchmarks": [bench], "looplm_reruns": reruns}, tmp_path))
    assert ("- Rerun: `benchmarks/test_a.py` at commit `abc1234`, 2026-12-02 08:00 UTC (load average 0.5); its rows replace "
            "the run's above.") in text
    assert ("- Not in this run: `benchmarks/test_b.py`; its rows are from commit `def5678`, 2026-12-01 07:00 UTC "
            "(load average 1.0).") in text
    assert "test_b.py` at commit" not in text
