"""`Engine.stream(..., on_event=fn)`: the engine's loop pushes each Step and the end to a callback."""

import threading

import pytest
import torch

import looplm

from .conftest import random_prompts, tiny_model


class Recorder:
    """An on_event callback: records what arrives, on which thread; `done` is set at the end."""

    def __init__(self, fail_at: int | None = None):
        self.items, self.threads, self.fail_at = [], set(), fail_at
        self.done = threading.Event()

    def __call__(self, item) -> None:
        self.threads.add(threading.current_thread().name)
        self.items.append(item)
        if not isinstance(item, looplm.Step):
            self.done.set()
        elif self.fail_at is not None and len(self.items) > self.fail_at:
            raise RuntimeError("a consumer bug")

    @property
    def steps(self) -> list[looplm.Step]:
        return [x for x in self.items if isinstance(x, looplm.Step)]

    @property
    def ends(self) -> list:
        return [x for x in self.items if not isinstance(x, looplm.Step)]


def _blocks_used(engine: looplm.Engine) -> int:
    return sum(c["blocks_used"] for c in engine.usage()["caches"].values())


@pytest.mark.parametrize("mode, options", [("full", {}), ("speculative", {"draft_loop": 1, "draft_len": 2}),
                                           ("anytime", {"budget_loops": 2})])
def test_steps_arrive_in_order_on_the_engine_thread_then_the_end_once(mode, options):
    engine = looplm.Engine(tiny_model(loops=3, max_pos=64))
    prompts = random_prompts(3, engine.config.vocab_size)
    want = engine.generate(prompts, max_new_tokens=9, stop=[], mode=mode, **options)
    got = Recorder()
    stream = engine.stream(prompts, max_new_tokens=9, stop=[], mode=mode, on_event=got, **options)
    assert got.done.wait(30)
    assert got.ends == [None] and got.items[-1] is None  # once, after every prompt's last step
    assert got.threads == {"looplm-engine"}
    for row, g in enumerate(want):
        mine = [s for s in got.steps if s.row == row]
        assert [s.index for s in mine] == list(range(9))
        assert [s.token for s in mine] == g.tokens == stream.generations[row].tokens
    assert _blocks_used(engine) == 0
    with pytest.raises(TypeError, match="on_event"):
        next(iter(stream))


def test_a_closed_stream_ends_once_and_frees_its_blocks():
    engine = looplm.Engine(tiny_model(loops=3, max_pos=96))
    first = threading.Event()
    got = Recorder()

    def on_event(item):
        got(item)
        first.set()

    stream = engine.stream([1, 2, 3], max_new_tokens=80, stop=[], on_event=on_event)
    assert first.wait(30)
    assert _blocks_used(engine) > 0
    stream.close()  # the client went away
    assert got.done.wait(30)
    assert got.ends == [None] and len(got.steps) < 80
    assert _blocks_used(engine) == 0 and engine.usage()["running"] == 0
    reference = engine.generate([[3, 4, 5], [9]], max_new_tokens=6, stop=[])  # the engine serves on
    assert [len(g.tokens) for g in reference] == [6, 6]


def test_a_raising_callback_cancels_its_request_and_the_engine_serves_on():
    engine = looplm.Engine(tiny_model(loops=3, max_pos=96))
    prompt = torch.randint(0, 61, (5,)).tolist()
    want = engine.generate(prompt, max_new_tokens=20, stop=[]).tokens
    bad, good = Recorder(fail_at=2), Recorder()
    streams = [engine.stream([1, 2], max_new_tokens=60, stop=[], on_event=bad),  # kept: a dropped Stream is cancelled
               engine.stream(prompt, max_new_tokens=20, stop=[], on_event=good)]  # beside it, in the same steps
    assert bad.done.wait(30) and good.done.wait(30)
    assert bad.ends == [None] and len(bad.steps) < 60  # cancelled after it raised; its end still arrives, once
    assert good.ends == [None] and [s.token for s in good.steps] == want
    assert _blocks_used(engine) == 0
    assert engine.generate(prompt, max_new_tokens=20, stop=[]).tokens == want
    del streams


def test_a_failed_step_ends_the_stream_with_its_error():
    engine = looplm.Engine(tiny_model(loops=3, max_pos=64))
    engine.generate([1], max_new_tokens=1, stop=[])  # makes the runner
    runner = engine.scheduler.runner("per_loop")
    run, calls = runner.run, []

    def failing(items):
        calls.append(len(items))
        if len(calls) == 3:
            raise RuntimeError("device error")
        return run(items)

    runner.run = failing
    got = Recorder()
    stream = engine.stream([[1, 2], [3]], max_new_tokens=10, stop=[], on_event=got)
    assert got.done.wait(30) and stream.generations[0].tokens
    assert len(got.ends) == 1 and isinstance(got.ends[0], RuntimeError) and got.items[-1] is got.ends[0]
    runner.run = run
    assert _blocks_used(engine) == 0
    assert len(engine.generate([1, 2], max_new_tokens=4, stop=[]).tokens) == 4
