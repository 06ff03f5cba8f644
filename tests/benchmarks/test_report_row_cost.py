"""benchmarks.report's row-cost subsection: one row per mode, the cost of a loop-body call by rows, and the bound."""

import random

from benchmarks.report import row_cost_headline, row_cost_lines


def _mode():
    return {k: random.uniform(0.5, 150) for k in ("decode_tokens_per_s", "loop_calls_per_token", "row_loops_per_token",
                                                   "loop_ms_per_token", "head_rows_per_token", "head_ms_per_token", "other_ms_per_token")}


def test_each_mode_is_a_row_and_the_bound_is_stated():
    c1, c4 = random.uniform(2, 4), random.uniform(4, 6)
    info = {"modes": {"full": _mode(), "speculative": _mode(), "trees": _mode()},
            "mode_options": {"speculative": {"draft_loop": 2, "draft_tokens": 2}, "trees": {"draft_loop": 1, "branch": 3}},
            "loop_ms_by_rows": {"1": c1, "4": c4}, "cost_ratio_by_rows": {"1": 1.0, "4": c4 / c1},
            "common_rows": 4, "row_bound": 4 * c1 / c4, "cheapest_rows": 4, "ratio_to_full": random.uniform(1, 2),
            "prompts": 8, "new_tokens": 128, "repeats": 3, "threads": 1,
            "load_average_before": [0.5, 0.6, 0.7], "load_average_after": [0.9, 0.8, 0.7]}
    bench = {"name": "test_row_cost", "fullname": "benchmarks/test_row_cost.py::test_row_cost", "extra_info": info}
    lines = row_cost_lines([{"name": "test_other", "extra_info": {}}, bench])
    table = [line for line in lines if line.startswith("| ") and not line.startswith("| mode")]
    assert len(table) == 3
    full = info["modes"]["full"]
    assert table[0].startswith(f"| full | {full['decode_tokens_per_s']:.1f} | {full['loop_calls_per_token']:.2f} | ")
    assert table[1].startswith("| speculative (draft_loop=2, draft_tokens=2) | ")
    assert table[2].startswith("| trees (draft_loop=1, branch=3) | ")
    text = " ".join(lines)
    assert f"4 rows {c4:.2f} ms ({c4 / c1:.2f}x)" in text and f"= {4 * c1 / c4:.2f}x" in text
    assert "0.5/0.6/0.7 -> 0.9/0.8/0.7" in text
    assert f"cheapest row-loop timed is at 4 rows: a decoder whose every call held 4 tokens that all pass would be bounded at {4 * c1 / c4:.2f}x" in text
    assert row_cost_lines([{"name": "test_other", "extra_info": {}}]) == []
    head = row_cost_headline([bench])
    assert f"costs **{c4 / c1:.2f}x** one row" in head and f"at **{4 * c1 / c4:.2f}x** full depth" in head
    assert row_cost_headline([{"name": "test_other", "extra_info": {}}]) is None
