"""Dagster layer: the pipeline's assets, checks, jobs and resources.

Each asset body reads its config and resources, makes one or two ``whale_ml``
calls and returns the value with the metadata a user looks at.
"""
