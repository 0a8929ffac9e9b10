"""Decoders turn a prompt into a token stream: plain decoding, the speculative cycle, the drafters
that propose blocks, the adaptive verify width, and sampling (one acceptance function)."""
