"""Objectives turn a batch into a loss: the only thing that differs between training modes."""
