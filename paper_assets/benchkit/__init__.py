"""Offline stand-ins and benchmarks, kept out of the production engine: a sample source in the notebook's schema
(``sample_source``), a small model of SPECTER2's architecture (``tiny_model``), the notebook's loop re-implemented
faithfully (``reference``, the only user of pandas), ``paper-assets bench`` (``bench``) and the release-scale
benchmark (``releases``)."""
