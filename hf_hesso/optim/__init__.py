from .cric import CRIC
from .hesso import HESSO
from .saliency import CRITERIA, GroupStatistics, SaliencyAccumulator, saliency_scores
from .schedule import Schedule

__all__ = ["CRIC", "CRITERIA", "HESSO", "GroupStatistics", "SaliencyAccumulator", "Schedule", "saliency_scores"]
