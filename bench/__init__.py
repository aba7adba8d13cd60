"""Micro-benchmarks and step/scale benchmarks. Imports everything; nothing imports it."""
