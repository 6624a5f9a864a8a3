"""The engine: a llama.cpp context decoding token by token with the sparse controls (``decode``),
sampling, text helpers, and numpy references of attention for the oracle tests. Knows nothing of
predictors or training: a predictor is anything with the ``decode.Predictor`` protocol."""
