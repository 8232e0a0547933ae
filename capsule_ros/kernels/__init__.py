"""Kernels of the lean forward: fused CUDA/Triton ones, and PyTorch references of the same math.

``ops.py`` holds both; the lean model picks by device (CPU: references only).
"""
