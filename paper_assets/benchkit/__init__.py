"""Benchmarks, kept out of the production engine: the notebook's loop re-implemented faithfully (``reference``, the
only user of pandas), ``paper-assets bench`` (``bench``, with ``measure``, ``pipeline_bench``, ``releases``,
``dagster_bench``, ``novelty_bench``, ``retrieval``, ``tokenizer_bench``) and the fault trials of ``paper-assets
chaos`` (``chaos``)."""
