"""Everything that runs inside a trial: models, data, sites, fault sampling, the engine.

Submodules are imported explicitly (``from trainables import engine``); this package
import stays light so torch-free modules (``trainables.stats``, ``trainables.results``)
can be used by the analysis side without pulling in torch.
"""
