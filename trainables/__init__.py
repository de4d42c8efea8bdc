"""Everything that runs inside a trial.

``trainables.inject``: bit flips, sites, fault lists, the engine and its prefix reuse.
``trainables.zoo``: the model and data registries and the demo models.
Top level: the trial function, the results schema, statistics and identity digests.
Submodules are imported explicitly; this package import stays light so torch-free modules
(``trainables.stats``, ``trainables.results``) serve the analysis side without torch.
"""
