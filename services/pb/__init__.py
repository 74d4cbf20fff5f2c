"""Generated protobuf and gRPC code, written by `make protos` and never edited by hand.

This file is not generated: it holds the descriptor pool every generated module registers
its messages in. A private pool lets our `inference.*` messages live in one process beside
tritonclient's copies of them (the default pool refuses a second definition of a symbol).
"""

from google.protobuf import descriptor_pool

POOL = descriptor_pool.DescriptorPool()
