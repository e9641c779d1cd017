"""Fine-tuning methods behind one interface (see ``base``): one file per method."""
from . import adapter as _adapter, apla as _apla, hta as _hta, lora as _lora, rlrr as _rlrr, simple as _simple, ssf as _ssf, vpt as _vpt  # noqa: F401,E501

_load_all = True  # importing the modules above registers every method
