"""Caption decoding: greedy, sampling with temperature, batched beam search; trigram blocking, no bad
endings and length penalties (:mod:`bnrhn.decoding.constraints`)."""

from bnrhn.decoding.constraints import BAD_ENDINGS, LENGTH_PENALTIES, bad_ending_ids, length_penalty
from bnrhn.decoding.reference import beam_search_one
from bnrhn.decoding.search import METHODS, Hypothesis, beam_search, decode, greedy, sample

__all__ = ["Hypothesis", "greedy", "sample", "beam_search", "decode", "METHODS", "beam_search_one",
           "BAD_ENDINGS", "LENGTH_PENALTIES", "bad_ending_ids", "length_penalty"]
