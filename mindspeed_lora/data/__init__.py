"""Data: raw samples -> Megatron indexed datasets (preprocess_data.py), and the training datasets.

Preprocessing modules (none imports megatron or transformers at import time, so worker processes start fast):
``readers`` (json / jsonl / parquet / csv files and directories, ``path#N``), ``templates`` (templates.json in
MindSpeed-LLM's structure), ``handlers`` (the handler names MindSpeed-LLM scripts pass), ``encoder`` (token ids
in batches), ``encode`` (one chunk of samples -> int32 arrays), ``indexed_writer`` (the .bin/.idx pair),
``packing`` and ``preprocess`` (the job).
"""
