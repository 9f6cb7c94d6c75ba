"""Prefect flows over the :mod:`pipeline` entry points: ``segment``, ``weight-maps``, ``train``,
``ingest``.

Each flow takes one typed settings model (the same one the CLI fills), so the Prefect UI
renders a form with defaults and descriptions; stages are coarse Prefect tasks and blocks are
Dask futures, never one Prefect task run per block. Deployments are in ``deploy/prefect.yaml``.
"""
