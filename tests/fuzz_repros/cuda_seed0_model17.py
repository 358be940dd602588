"""GPU fuzz reproducer: call 0: output 0: relative error inf > 0.0001 (eager's own: 5.64e-08)

Saved by tests/fuzz_campaign.py; tests/test_gpu_fuzz.py runs every file of this directory on the
GPU (pytest -m gpu) and in the interpreter. Keep it once fixed, as a regression test.

    inputs [((5, 7), 'float32')]
      v1 = rms_norm(0,)[('affine', False)]
      v2 = matmul_bt(0, 1)
      return ['v2']

As found (7 steps):
    inputs [((5, 7), 'float32')]
      v1 = rms_norm(0,)[('affine', False)]
      v2 = layer_norm(0,)[('affine', False)]
      v3 = linear(1,)[('out', 17), ('bias', False)]
      v4 = matmul_bt(0, 1)
      v5 = matmul_at(1, 3)
      v6 = linear(5,)[('out', 7), ('bias', False)]
      v7 = matmul_at(4, 3)
      return ['v4', 'v7']
"""

import torch
from test_fuzz import Program, Step, Value

PROGRAM = Program(
    inputs=(Value((5, 7), torch.float32),),
    steps=(
        Step("rms_norm", (0,), (("affine", False),)),
        Step("matmul_bt", (0, 1), ()),
    ),
    outputs=(2,),
)
OPTIONS = {
    "elementwise_block": None,
    "matmul_tile": (16, 16, 16),
    "row_block": 4,
    "row_chunk": 1024,
    "schedule": "static",
    "split_k": None,
}
SEED = 65536
PROBLEM = "call 0: output 0: relative error inf > 0.0001 (eager's own: 5.64e-08)"
