"""Makes `fakes.py` importable as `policy_fakes`: a unique module name, so test helpers of
other packages named `fakes` can never shadow it (test folders have no __init__.py)."""

import importlib.util
import pathlib
import sys

if "policy_fakes" not in sys.modules:
    _spec = importlib.util.spec_from_file_location("policy_fakes", pathlib.Path(__file__).with_name("fakes.py"))
    _module = importlib.util.module_from_spec(_spec)
    sys.modules["policy_fakes"] = _module
    _spec.loader.exec_module(_module)
