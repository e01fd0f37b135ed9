"""Head-parallel (tensor-parallel) inference over several processes with torch.distributed.

Attention heads are independent in longroll: caches, plans and ANN projections are per global head id. A run
of N processes therefore shards every layer by heads (:func:`shard_wan_model`: q/k/v columns, output rows, FFN
columns, an all-reduce after each), and each process's :class:`HeadParallelProcessor` holds only its heads'
caches and plans, so no cache ever moves between processes. Launch with torchrun (NCCL on GPUs, gloo on CPU);
see :func:`init_from_env`.
"""

from longroll.parallel.group import ALL_REDUCE_SPAN, HeadParallelGroup, split_range
from longroll.parallel.launch import Launched, free_port, init_from_env, launched_world_size
from longroll.parallel.layers import ShardedFeedForward, ShardedWanAttention
from longroll.parallel.model import is_sharded, shard_wan_model
from longroll.parallel.processor import GroupAnnCA, HeadParallelProcessor

__all__ = [
    "ALL_REDUCE_SPAN",
    "GroupAnnCA",
    "HeadParallelGroup",
    "HeadParallelProcessor",
    "Launched",
    "ShardedFeedForward",
    "ShardedWanAttention",
    "free_port",
    "init_from_env",
    "is_sharded",
    "launched_world_size",
    "shard_wan_model",
    "split_range",
]
