"""Serving: sparse decode on an existing ``llama_cpp.Llama`` (``sparsify``) and the
OpenAI-compatible server (``serve``)."""
