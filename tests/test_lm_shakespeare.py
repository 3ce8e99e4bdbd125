"""A short real training run: a character LSTM on tiny Shakespeare must beat the unigram model clearly."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from bnrhn.data.text import CharCorpus
from bnrhn.lm.train import LMTrainConfig, train_char_lm

DATA = Path(os.environ.get("BNRHN_DATA", Path(__file__).resolve().parents[1] / ".." / "shared" / "data"))
SHAKESPEARE = DATA / "text" / "tinyshakespeare" / "input.txt"


@pytest.mark.data
def test_training_lowers_validation_bpc_clearly_below_the_unigram_entropy(tmp_path):
    if not SHAKESPEARE.is_file():
        pytest.skip(f"tiny Shakespeare not found at {SHAKESPEARE} (set BNRHN_DATA)")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        cfg = LMTrainConfig(run_dir=str(tmp_path / "run"), text=str(SHAKESPEARE), cell="lstm", hidden=64,
                            batch_size=32, seq_len=50, lr=1e-2, max_steps=150, epochs=1, eval_batch_size=256,
                            valid_chars=20000, test_fraction=0.0, progress=False)
        corpus = CharCorpus.from_file(SHAKESPEARE, 0.05, 0.0)
        unigram = corpus.summary()["train_unigram_bits"]  # 4.77 bits: the BPC of character frequencies alone
        res = train_char_lm(cfg, corpus=corpus, log=lambda s: None)
    finally:
        torch.set_num_threads(threads)
    bpc = res["valid"]["bpc"]
    assert res["steps"] == 150 and res["valid"]["chars"] == corpus.valid.numel() - 1
    # About 3.1 BPC after 150 windows (240k characters, a quarter epoch); demand a full bit below the unigram model.
    assert bpc < unigram - 1.0, (bpc, unigram)
