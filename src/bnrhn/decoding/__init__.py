"""Caption decoding: greedy, sampling with temperature, batched beam search."""

from bnrhn.decoding.reference import beam_search_one
from bnrhn.decoding.search import METHODS, Hypothesis, beam_search, decode, greedy, sample

__all__ = ["Hypothesis", "greedy", "sample", "beam_search", "decode", "METHODS", "beam_search_one"]
