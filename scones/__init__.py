"""SCONES: score-based generative networks for large-scale entropic optimal transport.

Library layout (no Hydra inside):

- :mod:`scones.data`      distributions (``sample(n)``, optional exact ``score(y)``) and dataset pairs
- :mod:`scones.ot`        costs, regularisers (KL, chi^2), Gaussian closed forms, Sinkhorn solvers
- :mod:`scones.nets`      MLPs and score networks
- :mod:`scones.models`    LightningModules: dual potentials, score model (DSM), barycentric projection
- :mod:`scones.sampling`  noise schedules and (conditional, annealed) Langevin samplers
- :mod:`scones.metrics`   BW-UVP and friends
"""

__version__ = "0.1.0"
