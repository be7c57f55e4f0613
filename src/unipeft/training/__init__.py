"""What a training step needs besides the adapters: the chunked LM loss (losses.py), gradient checkpointing with
optional host offload (checkpointing.py), and a lean host heap (hostmem.py)."""
