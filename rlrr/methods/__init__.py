"""Fine-tuning methods behind one interface (see ``base``): one file per method.  Importing this package
registers every method (``base`` is reached through it, so a registered name is always there)."""
from . import adapter as _adapter, apla as _apla, hta as _hta, lora as _lora, rlrr as _rlrr, simple as _simple, ssf as _ssf, vpt as _vpt  # noqa: F401,E501
from . import pace as _pace, peft as _peft  # noqa: F401 - composed names: <method>+pace, peft:<tuner>
