"""engramlm: DeepSeek's Engram conditional memory, exact and fast.

Layers (lower never imports higher): hashing -> store -> nn -> models -> train/infer/analysis -> cli.
"""

__version__ = "0.1.0"
