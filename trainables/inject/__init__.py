"""Fault injection: bit flips, site enumeration, counter-based fault lists, the engine and prefix reuse."""
