"""Fused Triton kernels for Flow-GRPO: token log-probs, the clipped loss with KL, and the LM-head variant.

Each op has a Triton kernel (CUDA), a chunked torch path (everywhere else), and a plain-torch
reference in `kernels.reference`. This package imports only torch and triton.
"""
