"""What a run needs around its train step: Orbax checkpoints of the state and the data
iterator (`checkpoint.py`), metric writers (`metrics.py`), preemption notices
(`preemption.py`), the non-finite guard (`nonfinite.py`), and user paths, local or gs://,
handled in one module (`paths.py`)."""
