"""Benchmarks as data: cards (`load_card`), their validation (`validate_card`), sample records, loaders, ASD,
collation and the SynthCIT generator."""

from mcit.data.cards import load_card
from mcit.data.validate import validate_card

__all__ = ["load_card", "validate_card"]
