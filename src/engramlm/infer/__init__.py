"""Inference: sampling, the batch generation engine and the table sources it serves rows from.

Layer: above ``models`` and ``store``; below ``cli``.
"""

from engramlm.infer.engine import Engine, Generation, GenerationStats, StepOutput
from engramlm.infer.sampling import SamplingParams, filter_logits, sample

__all__ = ["Engine", "Generation", "GenerationStats", "SamplingParams", "StepOutput", "filter_logits", "sample"]
