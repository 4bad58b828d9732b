"""The recalibration engine: the exact eval-mode fixed point of every BN's statistics.

`plan` finds the BNs and cuts the graph into stages between BN levels; `recalibrate` runs the stages
on ONNX Runtime; `moments` holds the mergeable float64 statistics (with the optional C kernel
`_moments.c`); `store` keeps the tensors that cross a cut, in RAM up to a budget, then on disk.
"""
