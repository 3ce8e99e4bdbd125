"""Character-level language modelling: training task, evaluation (nats, BPC, perplexity), sampling and
the seed-report experiment (LSTM vs BN-LSTM variants on PTB characters)."""
