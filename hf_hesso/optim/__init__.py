from .cric import CRIC
from .hesso import HESSO
from .saliency import CRITERIA, GroupStatistics, SaliencyAccumulator, saliency_scores

__all__ = ["CRIC", "CRITERIA", "HESSO", "GroupStatistics", "SaliencyAccumulator", "saliency_scores"]
