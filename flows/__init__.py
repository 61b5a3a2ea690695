"""Prefect flows over llmpipe's stages, and the ``llmpipe`` command."""
