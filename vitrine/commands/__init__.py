"""Subcommands of the ``vitrine`` CLI, one module per layer."""
