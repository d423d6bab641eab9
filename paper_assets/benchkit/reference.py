"""A faithful re-implementation of the notebook's embedding loop: the baseline the benchmark compares against.

Kept deliberately as the notebook wrote it (``OFFSET`` paging ordered by corpusid, pandas ``iterrows``,
unsorted batches of 64 padded to the longest, fp32, Python float lists inserted with ``executemany``), including
its text formatting ``f"{title} {sep} {abstract}"`` (which embeds the string "None" for a missing abstract).
"""

from __future__ import annotations

from pathlib import Path

import duckdb
import numpy as np
import torch

FETCH_BATCH_SIZE = 10_000
EMBED_BATCH_SIZE = 64


def embed_batch(texts, tokenizer, model, device, batch_size=EMBED_BATCH_SIZE, stats=None):
    all_embeddings = []
    for i in range(0, len(texts), batch_size):
        batch_texts = texts[i : i + batch_size]
        inputs = tokenizer(
            batch_texts, padding=True, truncation=True, max_length=512, return_tensors="pt",
            return_token_type_ids=False,
        ).to(device)
        if stats is not None:
            stats["real_tokens"] += int(inputs["attention_mask"].sum())
            stats["padded_tokens"] += int(inputs["attention_mask"].numel())
        with torch.no_grad():
            outputs = model(**inputs)
            embeddings = outputs.last_hidden_state[:, 0, :]
        all_embeddings.append(embeddings.cpu().numpy())
    return np.vstack(all_embeddings)


def run_seed_recipe(source_path: str, tokenizer, model, device, out_db: str | Path, limit: int | None = None,
                    table: str = "papers_with_abstracts") -> dict:
    """Embed the first ``limit`` papers (by corpusid) the notebook's way into ``out_db``; return token stats."""
    cleaned_db = duckdb.connect(str(source_path), read_only=True)
    embeddings_db = duckdb.connect(str(out_db))
    dim = int(model.config.hidden_size)
    embeddings_db.execute(
        f"CREATE TABLE IF NOT EXISTS embeddings (corpusid VARCHAR PRIMARY KEY, embedding FLOAT[{dim}])"
    )
    total_count = cleaned_db.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0]
    if limit is not None:
        total_count = min(total_count, limit)
    stats = {"real_tokens": 0, "padded_tokens": 0}
    offset = 0
    while offset < total_count:
        papers_df = cleaned_db.execute(
            f"SELECT corpusid, title, abstract, publication_date, citation_count FROM {table} "
            f"ORDER BY corpusid LIMIT {min(FETCH_BATCH_SIZE, total_count - offset)} OFFSET {offset}"
        ).df()
        if len(papers_df) == 0:
            break
        texts = [f"{row['title']} {tokenizer.sep_token} {row['abstract']}" for _, row in papers_df.iterrows()]
        embeddings = embed_batch(texts, tokenizer, model, device, stats=stats)
        insert_data = [
            {"corpusid": str(row["corpusid"]), "embedding": embeddings[idx].tolist()}
            for idx, (_, row) in enumerate(papers_df.iterrows())
        ]
        embeddings_db.executemany(
            "INSERT OR REPLACE INTO embeddings (corpusid, embedding) VALUES (?, ?)",
            [(d["corpusid"], d["embedding"]) for d in insert_data],
        )
        embeddings_db.commit()
        offset += FETCH_BATCH_SIZE
    cleaned_db.close()
    embeddings_db.close()
    return stats


def read_reference(out_db: str | Path) -> tuple[np.ndarray, np.ndarray]:
    with duckdb.connect(str(out_db), read_only=True) as conn:
        rows = conn.execute("SELECT CAST(corpusid AS BIGINT), embedding FROM embeddings ORDER BY 1").fetchall()
    ids = np.array([r[0] for r in rows], dtype=np.int64)
    vectors = np.array([r[1] for r in rows], dtype=np.float32)
    return ids, vectors
