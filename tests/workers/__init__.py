"""The worker scripts the multi-process tests start, and what they share.

ddp_check.py, fsdp2_check.py and zero3_check.py each fit CAT one level below Axolotl, under
torchrun (several ranks) or as one plain process (the reference). common.py is what the
workers share (the tiny world, the rows they train on, their coefficients); launch.py is the
one way the tests start them (tests/test_distributed.py, test_fsdp2.py, test_zero3.py,
test_gpu.py).
"""
