"""Adapters that present tierstore collections to other frameworks.

Each lives in its own module and imports its framework there, never from tierstore's
core, so ``import tierstore`` does not need any of them:

- :mod:`.langchain`: ``TierstoreVectorStore``, a ``langchain_core`` ``VectorStore``
  (``pip install 'tierstore[langchain]'``).
- :mod:`.llamaindex`: ``TierstoreVectorStore``, a ``llama_index.core``
  ``BasePydanticVectorStore`` usable in a ``VectorStoreIndex``
  (``pip install 'tierstore[llamaindex]'``).
- :mod:`._common`: string ids as row ids and metadata schemas, shared by both.
"""
