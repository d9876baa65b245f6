"""Losses, registered by name in :mod:`ephys_gpt.models.registry` (``loss_name`` in configs)."""
