"""Import of weights trained by other libraries: open_clip's CLIP and CoCa (`open_clip.py`)."""
