"""Parallelism: the device mesh from config and topology, the logical-axis rules and the
shardings of state and batches (`sharding.py`), and joining a multi-process run on a TPU
slice, under SLURM or from a local launcher (`distributed.py`)."""
