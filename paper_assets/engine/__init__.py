"""The pure engine: text rules, source reading, tokenisation, batching, model, vectors, storage, publishing.

Nothing in this package imports Dagster; ``paper_assets.defs`` wires it into assets, checks and sensors.
"""
