"""The OpenAI-compatible gateway: a Litestar app served by Granian."""
