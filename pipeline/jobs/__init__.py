"""Jobs: the blockwise jobs on Dask, all of one shape (:mod:`pipeline.jobs.blockwise`: plan ->
run the pending blocks -> summary -> pyramid): :mod:`~pipeline.jobs.predict`,
:mod:`~pipeline.jobs.weights`, :mod:`~pipeline.jobs.ingest`, :mod:`~pipeline.jobs.pyramid`;
the model on a worker (:mod:`~pipeline.jobs.inference`); tissue masks; and training
(:mod:`~pipeline.jobs.patches` samples, :mod:`~pipeline.jobs.train` is the loop)."""
