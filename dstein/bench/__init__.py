"""Benchmarks that write JSON (``python launch/bench.py --suite NAME``), one module per concern:

- ``measure``: how a configuration is timed and measured (ranks timing training steps, whole
  training runs, the machine);
- ``speed``: seconds per step (scaling, methods, samples, beyond, acceptance);
- ``data``: HDF5 writing and reading, a test set's generation;
- ``peers``: the original code, the peers' problems, the shipped configs' accuracy;
- ``gpu``: agreement with the CPU on a device, and steps per second there.
"""
