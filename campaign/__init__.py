"""The campaign driver: spec, validation, the Ray Tune runner, aggregation, resume, CLI.

The only package that imports ``ray.tune``; ``campaign.spec`` itself imports neither Ray
nor torch at module level.
"""


def run(model, data, **settings):
    """A campaign from Python on an in-memory model (or factory) and data; returns the trials
    DataFrame (campaign.notebook.run)."""
    from campaign.notebook import run as run_notebook

    return run_notebook(model, data, **settings)
