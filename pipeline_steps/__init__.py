"""Iterative PPO pipeline steps.

One module per step of Algorithm 1 (Jiang et al., 2025), each runnable as
``python -m pipeline_steps.<step>``. Shared code lives in :mod:`pipeline_steps.common`;
the simulated customer/business world lives in :mod:`pipeline_steps.world`.
"""

__version__ = "0.1.0"
