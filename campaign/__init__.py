"""The campaign driver: spec, validation, the Ray Tune runner, aggregation, resume, CLI.

The only package that imports ``ray.tune``; ``campaign.spec`` itself imports neither Ray
nor torch at module level.
"""
