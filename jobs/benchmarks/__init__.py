"""The benchmark suite: meta-training throughput vs an L2L-style reference loop, the learned
optimizer's step vs torch.optim.Adam, and meta-training memory vs unroll length.

Run everything with ``python -m jobs.benchmarks [--quick]`` from the repository root; each
benchmark also runs alone (``python -m jobs.benchmarks.<name> --help``).
"""
