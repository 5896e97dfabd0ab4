"""ostquant: 4-bit LLM inference (OSTQuant) with learned orthogonal + scaling transforms."""
__version__ = "0.1.0"

from . import ops  # noqa: F401,E402  (registers torch.ops.ostquant.*)
