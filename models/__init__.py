"""Shipped models (installed as the ``wsiseg.models`` package)."""
