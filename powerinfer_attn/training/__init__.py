"""Training predictors: text corpora of several kinds (``corpus``), recording head importance
(``collect``), fitting (``train``), retrieval heads (``retrieval``), diagnosis off the training
text (``diagnose``) and the one-command pipeline (``prepare``)."""
