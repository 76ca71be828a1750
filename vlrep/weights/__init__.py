"""Weights in and out of vlrep: exported model directories (`export.py`), `config.init_from`
(`init_from.py`), open_clip and Hugging Face transformers checkpoints read (`open_clip.py`,
`hf.py`, with their entry-by-entry name mappings `open_clip_params.py`, `hf_params.py`) and
written (`to_open_clip.py`, `to_hf.py`), and the `python -m vlrep.convert` command line
(`convert.py`)."""
