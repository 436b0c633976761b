"""engramlm: DeepSeek's Engram conditional memory, exact and fast.

Layers (lower never imports higher; ``|`` siblings never import each other), enforced by the import-linter
contracts in pyproject.toml: errors < utils < assets < nn | store | hashing | data < models
< dist < train | infer | analysis < cli.
"""

__version__ = "0.1.0"
