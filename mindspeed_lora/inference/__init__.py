"""KV-cache generation on megatron-core GPTModel (TP-aware), chat, streaming; see engine.py and generation.py."""
