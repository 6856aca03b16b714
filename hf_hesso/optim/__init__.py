"""The optimizers: `HESSO` and `CRIC`, with `Schedule` (the step arithmetic schedules built on HESSO read) and the
names of the saliency criteria. The parts they are made of stay in their modules (`docs/optimizer.md`)."""

from .cric import CRIC
from .hesso import HESSO
from .saliency import CRITERIA
from .schedule import Schedule

__all__ = ["CRIC", "CRITERIA", "HESSO", "Schedule"]
