"""Head predictors: the predictors a spec names and its parser (``specs``), the predictor file
(``predictor_file``, a GGUF sidecar), fills for skipped heads (``fill``) and head importance
(``importance``). Built on the engine."""
