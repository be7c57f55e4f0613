"""Integrations with training libraries (transformers.Trainer, TRL); private names of those live in compat.py."""
