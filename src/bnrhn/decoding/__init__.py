"""Caption decoding: greedy, sampling with temperature, batched beam search."""

from bnrhn.decoding.reference import beam_search_one
from bnrhn.decoding.search import Hypothesis, beam_search, decode, greedy, sample

__all__ = ["Hypothesis", "greedy", "sample", "beam_search", "decode", "beam_search_one"]
