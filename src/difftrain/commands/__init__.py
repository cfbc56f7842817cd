"""The `difftrain sample` and `difftrain evaluate` commands: they load an exported pipeline, sample and write files.

They sit above the library layers (pipeline, sampling, evaluation, processes), which never import them.
"""
