"""`paper-assets verify` and the matches_s2_specter2 check against the fake S2 Graph API."""

from __future__ import annotations

import json

import numpy as np
from dagster import AssetKey, AssetSelection, build_sensor_context, instance_for_test, materialize

from paper_assets import cli
from paper_assets.definitions import build_definitions
from paper_assets.defs import embeddings, verification
from paper_assets.defs.ranged import range_tags
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
    # The check ran for each of the 5 partitions (update's runs of 4 and 1); failing (S2 knew no vector), it did
    assert len(checked) == 5  # not block them
    fake_s2.state.requests.clear()
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
        assert evaluation.metadata["partition"].value == evaluation.partition == key

        # A ranged run skips the separate check; s2_check_sensor then asks for a check-only run over the same range
        # (not for a run whose launcher runs the check itself, as update does), which checks each partition.
        ranged = sorted(p.stem.split("-", 1)[1] for p in ProjectHome(s2_home.home).embeddings_dir.glob(
            "embeddings-*.parquet"))[:3]
        instance.add_dynamic_partitions("corpusid_ranges", ranged[1:])
        steps, tags = [embeddings.papers, embeddings.paper_embeddings], range_tags(ranged[0], ranged[-1])
        for launcher_tags in ({verification.CHECKED_BY_LAUNCHER_TAG: "update"}, {}):
            assert materialize(steps, tags={**tags, **launcher_tags}, resources=defs.resources,
                               instance=instance).success
        tick = verification.s2_check_sensor.evaluate_tick(build_sensor_context(instance=instance, definitions=defs))
        (request,) = tick.run_requests
        assert request.asset_check_keys == [verification.CHECK_KEY] and request.tags.items() >= tags.items()
        fake_s2.state.requests.clear()
        result = materialize([*steps, verification.matches_s2_specter2], tags=request.tags, resources=defs.resources,
                             selection=AssetSelection.checks(*request.asset_check_keys), instance=instance)
        evaluations = [e for e in result.get_asset_check_evaluations() if e.check_name == verification.CHECK_NAME]
        assert {e.partition: e.passed for e in evaluations if e.partition} == dict.fromkeys(ranged, True)
        (summary,) = [e for e in evaluations if not e.partition]
        assert summary.passed and summary.metadata["partition_count"].value == len(ranged)
        later = verification.s2_check_sensor.evaluate_tick(build_sensor_context(
            instance=instance, definitions=defs, cursor=tick.cursor))
        assert later.run_requests == []  # the check-only run is not one to check again
        assert len([p for _, p, _ in fake_s2.state.requests if p == "/graph/v1/paper/batch"]) == len(ranged)

    rng = np.random.default_rng(0)
    fake_s2.state.vectors = {i: (v + rng.normal(0, 0.5, v.shape)).tolist() for i, v in ours.items()}
    assert cli.main(["verify", "--sample", "200"]) == 1
    assert capsys.readouterr().out.startswith("DOES NOT match S2's SPECTER2")


def test_verify_without_a_key_is_a_one_line_error(home, monkeypatch, capsys):
    monkeypatch.delenv("S2_API_KEY", raising=False)
    assert cli.main(["verify"]) == 2
    assert "S2_API_KEY" in capsys.readouterr().err
