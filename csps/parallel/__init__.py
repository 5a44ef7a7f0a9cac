"""Multi-process execution: process groups, collectives with byte accounting, and the
sequence-parallel attention paths (algorithms.md §2). The only package that imports
torch.distributed."""
