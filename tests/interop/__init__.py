"""A package, so that this folder's conftest.py (the torchvision stub) is imported as
`interop.conftest` and does not replace tests/conftest.py as `conftest`, which the other
tests import helpers from (`from conftest import load_config`)."""
