"""LLM layer: every agent call goes through LiteLLM (see :mod:`cellforge.llm.client`)."""
