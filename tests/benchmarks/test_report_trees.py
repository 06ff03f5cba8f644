"""benchmarks.report's draft-trees subsection: one row per setting of each sweep, adaptive rows named by their loops,
second-token draft rows with their counts."""

import random

from benchmarks.report import trees_lines


def _row(k, b, **extra):
    return {"draft_loop": k, "branch": b, "tokens_per_s": random.uniform(50, 150), "ratio_to_full": random.uniform(0.5, 2),
            "weight_passes_per_token": random.uniform(1, 4), "tokens_per_forward": random.uniform(0.3, 1),
            "rows_per_forward": None, "token_acceptance": random.random(), **extra}


def test_each_setting_is_a_row_and_adaptive_rows_say_where_they_drafted():
    rows = [_row(1, 1), _row(2, 3, rows_per_forward=3.96, acceptance_by_depth=[None, 0.5], won_by_rank=[9, 2, 1]),
            _row("adaptive", 1, call_cost=2.0, tokens_by_loop={"1": 91, "2": 1957}),
            _row(2, 1, draft_tokens=2, second_threshold=0.5, seconds=40, seconds_tested=30, seconds_accepted=12, pairs_emitted=11),
            _row(2, 1, draft_tokens=2, second_threshold="adaptive", seconds=50, seconds_tested=40, seconds_accepted=31, pairs_emitted=30)]
    greedy = {"name": "test_draft_trees_sweep", "extra_info": {"rows": rows, "full_tokens_per_s": 140.0,
                                                               "full_weight_passes_per_token": 4.0, "new_tokens": 128}}
    sampled = {"name": "test_draft_trees_sampling_sweep", "extra_info": {**greedy["extra_info"], "rows": rows[:1], "temperature": 0.8}}
    lines = trees_lines([{"name": "test_other", "extra_info": {}}, greedy, sampled])
    table = [line for line in lines if line.startswith("| ") and not line.startswith("| draft loop")]
    assert len(table) == 6
    assert table[0].startswith("| 1 | 1 | ") and f"| {rows[0]['ratio_to_full']:.2f} |" in table[0]
    assert table[1].endswith("| – / 0.50 | [9, 2, 1] |") and "| 3.96 |" in table[1]
    assert table[2].startswith("| adaptive, call cost 2 (91 at loop 1, 1957 at loop 2) | 1 | ")
    assert table[3].startswith("| 2 | 1, second drafts at top-1 >= 0.5: 12/30 passed, 11 forwards emitted 2 | ")
    assert table[4].startswith("| 2 | 1, second drafts chosen per request: 31/40 passed, 30 forwards emitted 2 | ")
    assert any(line.startswith("sampling at temperature 0.8") for line in lines)
    assert trees_lines([{"name": "test_other", "extra_info": {}}]) == []
