"""Importers for real checkpoints read from local directories (no downloads)."""
