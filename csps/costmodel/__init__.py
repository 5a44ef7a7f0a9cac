"""Cost models: how long an iteration takes, predicted from what the scheduler decided.

Pure Python (no torch): the policies (configurators, LoongServe's batching) and the simulator
import it. `base` holds the contract (RankWork, CostModel), `shape` the model's dimensions.
"""
