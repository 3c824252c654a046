"""Pieces every layer of graft may use; the bottom layer, importing no other graft package."""
