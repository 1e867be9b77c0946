"""Typed API models: the MoEJob resource, model architectures, device catalog and pools."""
