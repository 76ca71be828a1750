"""Tools around the real train step: its speed and MFU (`bench.py`, `python -m vlrep.bench`),
its ahead-of-time compilation for TPU and GPU targets (`plan.py`, `python -m vlrep.plan`, with
XLA's GPU target configs in `gpu_targets/`), the analytic model FLOPs both use (`flops.py`)
and parameter counts per part (`describe.py`, `python -m vlrep.describe`)."""
