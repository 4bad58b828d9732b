"""Test helpers shared across the tree (`models`, `reference`, `torchvision_reference`) import by name.

pytest puts this folder on sys.path (rootdir-relative "prepend" import mode) because it holds this
conftest; the per-room folders below (engine/, folding/, …) mirror `bnfold/`.
"""
