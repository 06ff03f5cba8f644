import os

import torch

# The Triton kernel runs on the CPU only in the interpreter, which reads this variable when the
# kernel is defined, i.e. before kernels.triton_attention is first imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
