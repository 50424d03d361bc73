"""Model engines behind the stages: each loads a model folder with `from_pretrained` (or reads a file
made elsewhere) and turns a batch of requests into outputs.

- `mllm`: descriptions of images and videos (vLLM, transformers, import).
- `mt`: machine translation with seq2seq models.
- `vectors`: vector indexes over normalised embeddings (exact, FAISS IVF / HNSW): built by the index
  stage, searched by `leccr search`.
- `cache`: one loaded engine per process, reused by every shard that process computes.

Engines import their heavy libraries (torch, transformers, vllm) inside their constructors, so
importing this package is cheap and a machine without vLLM can use the other engines.
"""
