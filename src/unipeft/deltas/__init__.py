"""What Δh computes: thin parameter holders that call the pure functions in `unipeft.functional`."""

from .base import DeltaModule, build_delta
from .bottleneck import BottleneckDelta
from .conv import ConvLowRankDelta
from .dora import DoraDelta, WeightDecomposed
from .dora_embedding_conv import DoraConvDelta, DoraEmbeddingDelta
from .embedding import EmbeddingLowRankDelta
from .low_rank import LowRankDelta
from .prefix import PrefixDelta
from .prompt import PromptDelta
from .scaling import ScalingDelta

__all__ = ["DeltaModule", "build_delta", "LowRankDelta", "ScalingDelta", "BottleneckDelta", "PrefixDelta", "PromptDelta",
           "DoraDelta", "WeightDecomposed", "EmbeddingLowRankDelta", "ConvLowRankDelta",
           "DoraConvDelta", "DoraEmbeddingDelta"]
