"""The default size of the paged cache: one whole context when memory allows, never more than a
share of the free memory (a long-context model would otherwise ask for tens of GB at once)."""

import pytest

import looplm
from looplm.paged import DEFAULT_CACHE_BYTES, bytes_per_position
from looplm.scheduler import CACHE_MEMORY_SHARE

from .conftest import tiny_model


def _cache_bytes(engine, kv="per_loop"):
    s = engine.scheduler
    return s.num_blocks(kv) * s.block_size * bytes_per_position(engine.config, kv, engine.model.lm_head.weight.dtype)


def test_a_short_context_model_gets_the_default_budget_or_a_whole_context():
    engine = looplm.Engine(tiny_model(max_pos=64))
    per_pos = bytes_per_position(engine.config, "per_loop", engine.model.lm_head.weight.dtype)
    assert engine.scheduler.num_blocks("per_loop") * engine.scheduler.block_size >= 64
    assert _cache_bytes(engine) <= DEFAULT_CACHE_BYTES + engine.scheduler.block_size * per_pos


@pytest.mark.parametrize("free_mib", [64, 2048, 8192])
def test_a_long_context_model_takes_at_most_a_share_of_free_memory(free_mib):
    engine = looplm.Engine(tiny_model(max_pos=1 << 24))  # a whole context would be tens of GB here
    engine.scheduler.free_memory = free_mib << 20
    per_pos = bytes_per_position(engine.config, "per_loop", engine.model.lm_head.weight.dtype)
    whole = (1 << 24) * per_pos
    got = _cache_bytes(engine)
    assert got <= max(DEFAULT_CACHE_BYTES, CACHE_MEMORY_SHARE * (free_mib << 20)) < whole
    assert got >= min(DEFAULT_CACHE_BYTES, CACHE_MEMORY_SHARE * (free_mib << 20)) - engine.scheduler.block_size * per_pos


def test_a_request_beyond_the_default_cache_is_refused_at_submit_with_the_fix_named():
    engine = looplm.Engine(tiny_model(max_pos=1 << 24))
    engine.scheduler.free_memory = 0  # the default budget only
    positions = engine.scheduler.num_blocks("per_loop") * engine.scheduler.block_size
    with pytest.raises(ValueError, match="raise cache_bytes"):
        engine.generate([1, 2, 3], max_new_tokens=positions, stop=[])
    assert engine.generate([1, 2, 3], max_new_tokens=4, stop=[]).tokens  # the engine stays usable
    assert engine.usage()["caches"]["per_loop"]["blocks_used"] == 0
