"""Structured outputs: JSON Schema compiled to a byte-level pushdown matcher, and token constraints over it."""
