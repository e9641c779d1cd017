"""Fine-tuning methods behind one interface (see ``base``): one file per method."""
from . import rlrr as _rlrr, simple as _simple, ssf as _ssf  # noqa: F401 - importing registers each method

_load_all = True
