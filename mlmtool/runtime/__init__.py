"""The process around a run: devices and hosts, sharding, kernel choice, the compilation cache,
locks, signals, progress and TensorBoard output.
"""
