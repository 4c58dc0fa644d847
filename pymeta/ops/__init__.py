"""pymeta's fused ops: one autograd-aware custom op per file, up to four backends each.

``inner_sgd`` (fused ``p - lr * g`` over all fast weights of all tasks), ``prototypes``
(per-task class means), ``proto_logits`` (negative distances, no ``[T, Q, N, D]``
temporary), ``max_pool2d`` and ``adaptive_max_pool2d`` (``F.max_pool2d`` and
``F.adaptive_max_pool2d`` with faster CPU forwards),
``relation_pairs`` (a Relation Network's first BatchNorm and ReLU over every (query,
class) pair, no ``[Q * N, 2C, H, W]`` pairs), ``batch_norm_relu_pool`` (a conv4
block's BatchNorm, ReLU and 2x2 max-pooling in one pass), ``memory_access`` (one MANN step: LRU
write and cosine reads) and ``grouped_conv2d`` (``F.conv2d`` whose double backward runs no
per-group loop: the tasks-as-groups convolution of second-order MAML), and
``conv2d_batch_norm_relu_pool`` (an image model's first block, convolution to pooling,
in one pass that never writes the convolution's output). ``backends()`` says which backends run here and why the others
do not; ``usage()`` which backend each op call of this process ran on, and why.
"""

from pymeta.ops._backends import backends, force_backend, reset_usage, usage
from pymeta.ops.adaptive_max_pool2d import adaptive_max_pool2d
from pymeta.ops.batch_norm_relu_pool import batch_norm_relu_pool
from pymeta.ops.conv2d_batch_norm_relu_pool import conv2d_batch_norm_relu_pool
from pymeta.ops.grouped_conv2d import grouped_conv2d
from pymeta.ops.inner_sgd import inner_sgd
from pymeta.ops.max_pool2d import max_pool2d
from pymeta.ops.memory_access import memory_access
from pymeta.ops.proto_logits import proto_logits
from pymeta.ops.prototypes import prototypes
from pymeta.ops.relation_pairs import relation_pairs

__all__ = [
    "adaptive_max_pool2d", "backends", "batch_norm_relu_pool", "conv2d_batch_norm_relu_pool", "force_backend", "grouped_conv2d", "inner_sgd", "max_pool2d", "memory_access", "proto_logits", "prototypes",
    "relation_pairs", "reset_usage", "usage",
]
