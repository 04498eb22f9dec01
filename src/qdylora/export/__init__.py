"""Shipping one rank: the PEFT LoRA export and the merge into the base."""
