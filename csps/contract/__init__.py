"""The contract between deciding and doing, below every other package: plain, torch-free values
that the scheduler decides and the workers, the cost model and the simulator read. Nothing here
imports anything of csps outside this package.
"""
