"""paper_assets: SPECTER2 embeddings of a Semantic Scholar paper database as Dagster assets."""

__version__ = "0.1.0"
