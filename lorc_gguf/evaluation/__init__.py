"""Evaluation: perplexity, KL and KV bytes of models on the patched runtime (``perplexity``,
``configs``, ``texts``, ``kv``, ``metrics``), greedy agreement (``compare``), speed (``bench``),
the quality table and the defaults study (``quality``), conversion time (``convert_bench``) and plots."""
