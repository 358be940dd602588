"""GPU fuzz reproducer: call 0: output 0: relative error inf > 0.0001 (eager's own: 6.56e-08)

Saved by tests/fuzz_campaign.py; tests/test_gpu_fuzz.py runs every file of this directory on the
GPU (pytest -m gpu) and in the interpreter. Keep it once fixed, as a regression test.

    inputs [((6, 20), 'float32')]
      v1 = matmul_bt(0, 0)
      v2 = matmul_bt(1, 1)
      return ['v2']

As found (6 steps):
    inputs [((6, 20), 'float32')]
      v1 = linear(0,)[('out', 20), ('bias', False)]
      v2 = matmul_bt(0, 0)
      v3 = unary(2,)[('fn', 'abs')]
      v4 = unary(3,)[('fn', 'exp_neg_abs')]
      v5 = matmul_bt(3, 2)
      v6 = unary(5,)[('fn', 'exp_neg_abs')]
      return ['v6']
"""

import torch
from test_fuzz import Program, Step, Value

PROGRAM = Program(
    inputs=(Value((6, 20), torch.float32),),
    steps=(
        Step("matmul_bt", (0, 0), ()),
        Step("matmul_bt", (1, 1), ()),
    ),
    outputs=(2,),
)
OPTIONS = {
    "elementwise_block": None,
    "matmul_tile": (16, 32, 32),
    "row_block": 4,
    "row_chunk": 1024,
    "schedule": "dynamic",
    "split_k": None,
}
SEED = 43
PROBLEM = "call 0: output 0: relative error inf > 0.0001 (eager's own: 6.56e-08)"
