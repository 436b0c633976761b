"""HF transformers and lm-evaluation-harness integration (optional extra ``hf``: transformers, lm_eval).

``engramlm.hf.adapter``: Engram added to an existing HF causal LM (``add_engram``, ``engram_optimizers``,
``save_engram`` / ``load_engram``). ``engramlm.hf.harness``: the ``engramlm`` model for lm-evaluation-harness
and the offline tasks built from prepared corpora (``engramlm.hf.evaltasks``).
"""
