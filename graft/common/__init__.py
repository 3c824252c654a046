"""Pieces every layer of graft may use (they import nothing else of graft)."""
