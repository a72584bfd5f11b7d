"""Cumulonimbus: approximate matrix products with learned lookup tables."""
