"""Lossless self-speculative decoding for looped LMs (mode "speculative"): draft at loop k, verify with loops k+1..T."""

from .accept import accept_greedy, accept_sampled, emitted_counts
from .decoder import DEFAULT_DRAFT_LEN, DEFAULT_DRAFT_LOOP, decode
from .schedule import DraftLength

__all__ = ["decode", "accept_greedy", "accept_sampled", "emitted_counts", "DraftLength", "DEFAULT_DRAFT_LOOP", "DEFAULT_DRAFT_LEN"]
