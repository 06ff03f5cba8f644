"""benchmarks.report's headline on the compiled fixed-shape step (full depth, and anytime with finish="ahead")."""

import random

from benchmarks.report import fixed_step_headline


def test_the_headline_states_each_ratio_that_was_measured():
    full = {"interleaved_speedup": random.uniform(1, 3), "tokens_per_s": random.uniform(100, 400)}
    ahead = {"interleaved_speedup": random.uniform(1, 2), "tokens_per_s": random.uniform(100, 400),
             "mean_exit_loop": random.uniform(1, 4), "x_full_same_step": random.uniform(0.5, 1.5)}
    plan = {"tokens_per_s": random.uniform(100, 400), "x_full_same_step": random.uniform(0.5, 1.5)}
    others = [{"name": "test_other", "extra_info": {"tokens_per_s": 1.0}},
              {"name": "test_full_depth_decode[compiled-default]", "extra_info": full},
              {"name": "test_full_depth_decode[compiled-random-100m]", "extra_info": {"interleaved_speedup": 9.0, "tokens_per_s": 9.0}},
              {"name": "test_anytime_ahead_decode[compiled]", "extra_info": ahead},
              {"name": "test_anytime_ahead_decode[eager]", "extra_info": plan}]
    head = fixed_step_headline(others)
    assert head.startswith(f"full depth **{full['interleaved_speedup']:.2f}x** the runner's plan ({full['tokens_per_s']:.1f} tokens/s); ")
    assert (f"finish=\"ahead\" **{ahead['interleaved_speedup']:.2f}x** its plan ({ahead['tokens_per_s']:.1f} tokens/s, mean exit "
            f"loop {ahead['mean_exit_loop']:.2f}), {ahead['x_full_same_step']:.2f}x full depth compiled (with the plan: "
            f"{plan['x_full_same_step']:.2f}x full depth's plan)") in head
    assert "9.00" not in head  # the random model's row is not the bundled model's
    # only what was measured: one part alone, or nothing
    assert fixed_step_headline(others[:3]).count("x**") == 1 and "anytime" not in fixed_step_headline(others[:3])
    assert fixed_step_headline(others[:1]) is None
