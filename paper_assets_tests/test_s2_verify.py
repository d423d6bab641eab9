"""`paper-assets verify` and the matches_s2_specter2 check against the fake S2 Graph API."""

from __future__ import annotations

import json

import numpy as np
from dagster import AssetKey, instance_for_test, materialize

from paper_assets import cli
from paper_assets.definitions import build_definitions
from paper_assets.defs import embeddings, verification
from paper_assets.engine.home import ProjectHome
from paper_assets.engine.s2_verify import compare

from .test_releases import home_vectors, update
from .test_s2_source import fake_s2, s2_home  # noqa: F401 - fixtures


def verify(capsys, *flags) -> tuple[int, dict]:
    code = cli.main(["verify", "--json", *flags])
    return code, json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_compare_counts_unknown_and_other_dimensions():
    ours = {1: np.ones(4, np.float32), 2: np.ones(4, np.float32), 3: np.ones(4, np.float32)}
    report = compare(ours, {1: 3 * np.ones(4, np.float32), 2: None, 3: np.ones(8, np.float32)})
    assert (report.compared, report.unknown_to_s2, report.dimension_mismatch) == (1, 1, 1)
    assert report.cosine_min == 1.0 and report.passed


def test_verify_and_the_check_read_1_against_our_own_vectors_and_fail_against_perturbed_ones(
        s2_home, fake_s2, capsys):  # noqa: F811 - the fixtures imported above
    assert update(capsys)["rows_embedded"] == 2000
    checked = [p for _, p, _ in fake_s2.state.requests if p == "/graph/v1/paper/batch"]
    assert len(checked) == 5  # the check ran beside each of the 5 partitions; failing (S2 knew no vector), it
    fake_s2.state.requests.clear()  # did not block them
    ours = home_vectors(ProjectHome(s2_home.home))
    unknown = set(sorted(ours)[::50])
    fake_s2.state.vectors = {i: (2.5 * v).tolist() for i, v in ours.items() if i not in unknown}
    fake_s2.state.throttle_next = 2

    code, report = verify(capsys, "--sample", "600")
    assert code == 0 and report["passed"] and fake_s2.state.throttle_next == 0  # 429s retried
    assert report["requested"] == 600 and report["compared"] + report["unknown_to_s2"] == 600
    assert 0 < report["unknown_to_s2"] < 40 and report["cosine_min"] > 0.9999
    batches = [p for _, p, _ in fake_s2.state.requests if p == "/graph/v1/paper/batch"]
    assert len(batches) == 2 + 2  # 600 ids: two requests of at most 500, plus the two answered 429

    key = sorted(ProjectHome(s2_home.home).embeddings_dir.glob("embeddings-*.parquet"))[0].stem.split("-", 1)[1]
    code, one_range = verify(capsys, "--range", key, "--sample", "50")
    assert code == 0 and one_range["requested"] == 50

    defs = build_definitions(s2_home)
    with instance_for_test() as instance:
        instance.add_dynamic_partitions("corpusid_ranges", [key])
        result = materialize([embeddings.papers, embeddings.paper_embeddings, verification.matches_s2_specter2],
                             partition_key=key, resources=defs.resources, instance=instance)
        (evaluation,) = [e for e in result.get_asset_check_evaluations()
                         if e.check_name == verification.CHECK_NAME]
        assert evaluation.passed and evaluation.asset_key == AssetKey("paper_embeddings")
        assert evaluation.metadata["partition"].value == key

    rng = np.random.default_rng(0)
    fake_s2.state.vectors = {i: (v + rng.normal(0, 0.5, v.shape)).tolist() for i, v in ours.items()}
    assert cli.main(["verify", "--sample", "200"]) == 1
    assert capsys.readouterr().out.startswith("DOES NOT match S2's SPECTER2")


def test_verify_without_a_key_is_a_one_line_error(home, monkeypatch, capsys):
    monkeypatch.delenv("S2_API_KEY", raising=False)
    assert cli.main(["verify"]) == 2
    assert "S2_API_KEY" in capsys.readouterr().err
