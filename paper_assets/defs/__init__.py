"""The Dagster layer: partitions, resources, assets, checks and sensors wiring ``paper_assets.engine``."""
