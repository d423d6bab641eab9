"""The exact k-NN search on the embedding device (``engine.device_knn``): equal to FAISS's fp32 exact search,
certified per query, bounded in memory, and reusing the rounded prior blocks across months."""

import warnings

import numpy as np
import pytest


def _unit(rows: np.ndarray) -> np.ndarray:
    return (rows / np.linalg.norm(rows, axis=1, keepdims=True)).astype(np.float32)


@pytest.mark.parametrize("low_precision", [True, False], ids=["bf16_candidates", "fp32"])
def test_device_search_equals_exact_fp32_search(low_precision):
    """bf16 candidates rescored in fp32 give the exact fp32 neighbours: the same cosines (to fp32 rounding) and the
    same papers except where two cosines are equal to that rounding. Clustered vectors put many near-ties at the
    k-th neighbour, so many queries rescore more than k candidates (the band at work)."""
    import torch

    from paper_assets.engine.device_knn import DeviceKnnStats, device_knn

    rng = np.random.default_rng(5)
    centres = rng.normal(size=(20, 64))
    priors = _unit(centres[rng.integers(0, 20, 6000)] + 0.5 * rng.normal(size=(6000, 64)))
    queries, end, k = priors[5000:5300], 5000, 50
    sims = queries @ priors[:end].T
    truth = np.argsort(-sims, axis=1, kind="stable")[:, :k]
    stats = DeviceKnnStats()
    positions, cosines = device_knn(queries, priors, end, k, torch.device("cpu"), low_precision=low_precision,
                                    stats=stats)
    np.testing.assert_allclose(cosines, np.take_along_axis(sims, truth, 1), atol=2e-6)
    differ = positions != truth
    assert differ.mean() < 0.01
    np.testing.assert_allclose(np.take_along_axis(sims, positions, 1)[differ], cosines[differ], atol=2e-6)
    assert stats.queries == 300
    assert stats.certified + stats.searched_again_in_fp32 == 300
    if low_precision:
        assert stats.rescored > 300 * k


def test_device_search_with_fewer_priors_than_k():
    import torch

    from paper_assets.engine.device_knn import device_knn

    priors = _unit(np.random.default_rng(1).normal(size=(30, 16)))
    priors.setflags(write=False)  # as the index's memory-mapped vectors are
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        positions, cosines = device_knn(priors[20:], priors, 5, 8, torch.device("cpu"))
    assert (positions[:, :5] >= 0).all() and (positions[:, 5:] == -1).all() and (cosines[:, 5:] == 0).all()
    assert sorted(positions[0, :5]) == [0, 1, 2, 3, 4]


@pytest.mark.parametrize("prior_rows", [101, 7, 384], ids=["blocks_above_k", "blocks_below_k", "column_slices"])
def test_device_search_in_blocks_smaller_than_a_month_equals_faiss_with_ties(monkeypatch, prior_rows):
    """Query and prior blocks far smaller than the month (prior blocks even smaller than k, or full blocks
    multiplied in column slices), duplicated papers (exact ties) and months with fewer priors than k: the ids,
    cosines and metrics equal FAISS's exact search (ids up to the order within a tie)."""
    import faiss
    import torch

    from paper_assets.engine import device_knn as knn
    from paper_assets.engine import knn_band
    from paper_assets.engine.novelty import metrics_from_cosines

    monkeypatch.setattr(knn, "QUERY_ROWS", 37)
    monkeypatch.setattr(knn, "PRIOR_ROWS", prior_rows)
    monkeypatch.setattr(knn, "SLICE_COLUMNS", 128)
    sliced = []  # the threshold passes of blocks multiplied in column slices
    monkeypatch.setattr(knn, "above", lambda *args: sliced.append(1) or knn_band.above(*args))
    rng = np.random.default_rng(11)
    centres = rng.normal(size=(8, 32))
    priors = _unit(centres[rng.integers(0, 8, 900)] + 0.4 * rng.normal(size=(900, 32)))
    priors[300:340] = priors[100:140]  # exact ties
    queries, k = priors[800:900], 20
    for end in (7, 30, 400, 800):
        sims, truth = faiss.knn(queries, priors[:end], min(k, end), metric=faiss.METRIC_INNER_PRODUCT)
        positions, cosines = knn.device_knn(queries, priors, end, k, torch.device("cpu"))
        k_eff = min(k, end)
        np.testing.assert_allclose(cosines[:, :k_eff], sims, atol=2e-6)
        assert (positions[:, k_eff:] == -1).all() and (cosines[:, k_eff:] == 0).all()
        exact = queries @ priors[:end].T
        for row, (mine, theirs) in enumerate(zip(positions[:, :k_eff], truth, strict=True)):
            for other in set(mine) ^ set(theirs):  # only papers tied with the k-th may differ
                assert exact[row, other] == pytest.approx(sims[row, -1], abs=2e-6)
        mine = metrics_from_cosines(cosines, (positions >= 0).sum(axis=1), k)
        padded = np.zeros((len(sims), k), np.float32)
        padded[:, :k_eff] = sims
        theirs = metrics_from_cosines(padded, np.full(len(sims), k_eff), k)
        for name, values in mine.items():
            np.testing.assert_allclose(values, theirs[name], atol=1e-5)
    assert bool(sliced) == (prior_rows % 128 == 0)


def test_fp32_rescoring_corrects_a_kth_neighbour_that_bf16_swaps(monkeypatch):
    """Two papers whose bf16 scores rank them the other way round from their fp32 cosines: both are in the band
    and the fp32 rescoring picks the true nearest. With a band capped at one candidate the bf16 winner is kept, its
    certificate fails, and the second pass (a wider cap) or, capped again, the fp32 search returns the true
    nearest."""
    import torch

    from paper_assets.engine import device_knn as knn
    from paper_assets.engine.device_knn import DeviceKnnStats, device_knn

    rng = np.random.default_rng(3)
    query = _unit(rng.normal(size=(1, 64)))
    for _ in range(10_000):
        near = query + 0.3 * rng.normal(size=(1, 64))
        pair = _unit(near + 1e-3 * rng.normal(size=(2, 64)))  # cosines ~1e-4 apart, below bf16's resolution
        fp32 = pair @ query[0]
        low = (torch.from_numpy(pair).bfloat16() @ torch.from_numpy(query[0]).bfloat16()).float().numpy()
        if fp32[0] > fp32[1] and low[0] < low[1]:
            break
    else:
        pytest.fail("no pair that bf16 orders the other way round")
    priors = np.vstack([pair, -pair]).astype(np.float32)  # two far papers after the pair
    for cap, wider, outcome in ((None, 8, (0, 0, 1)), (1, 8, (1, 0, 1)), (1, 1, (1, 1, 0))):
        monkeypatch.setattr(knn, "WIDER_CAP", wider)
        stats = DeviceKnnStats()
        positions, cosines = device_knn(query, priors, 4, 1, torch.device("cpu"), stats=stats, cap=cap)
        assert positions[0, 0] == 0 and cosines[0, 0] == pytest.approx(fp32[0], abs=1e-6)
        assert (stats.searched_again_wider, stats.searched_again_in_fp32, stats.certified) == outcome


def test_a_score_of_one_or_more_is_certified_with_the_wider_rounding_bound():
    """bf16 rounds a score from 1 up by up to 2^-8, twice the bound below 1: a query whose band reaches 1 (here a
    prior equal to the query) is searched again with that bound, and still gets the exact neighbours."""
    import torch

    from paper_assets.engine.device_knn import DeviceKnnStats, device_knn

    rng = np.random.default_rng(4)
    priors = _unit(rng.normal(size=(200, 32)))
    queries = priors[150:160].copy()
    scores = (torch.from_numpy(queries).bfloat16() @ torch.from_numpy(priors[150:160]).bfloat16().T).float()
    assert (torch.diagonal(scores) >= 1).any()
    stats = DeviceKnnStats()
    positions, cosines = device_knn(queries, priors, 160, 5, torch.device("cpu"), stats=stats)
    assert (positions[:, 0] == np.arange(150, 160)).all()
    np.testing.assert_allclose(cosines[:, 0], 1.0, atol=1e-6)
    assert 0 < stats.searched_again_wider <= 10 and stats.certified == 10


def _device_search_peak_rss(priors_count: int) -> int:
    import torch

    from paper_assets.benchkit.measure import PeakRSS
    from paper_assets.engine.device_knn import device_knn

    rng = np.random.default_rng(0)
    priors = _unit(rng.normal(size=(priors_count, 64)))
    queries = priors[-4000:].copy()
    with PeakRSS() as rss:
        device_knn(queries, priors, priors_count - 4000, 100, torch.device("cpu"))
    return rss.peak


def test_device_search_memory_is_bounded_by_its_blocks_not_by_the_priors():
    """Three times the priors (an unblocked search would hold 2.4 GB more query x prior scores) adds little more
    than the priors themselves (+41 MB), measured in child processes."""
    from paper_assets.benchkit.measure import in_a_fresh_process

    small = in_a_fresh_process(_device_search_peak_rss, 80_000)
    large = in_a_fresh_process(_device_search_peak_rss, 240_000)
    priors_growth = 160_000 * 64 * 4
    assert large - small < priors_growth + 200 * 2**20, (small, large)


@pytest.mark.parametrize("direct_share", [0.0, 1.1], ids=["every_score", "runs_first"])
def test_the_threshold_pass_finds_exactly_the_scores_at_or_above_each_rows_threshold(monkeypatch, direct_share):
    """``above`` (runs' maxima, then the runs left element by element; or every score at once) returns exactly the
    scores at or above each row's threshold rounded down to bf16, with their columns: continuous, mostly negative
    and heavily tied scores, widths with and without a remainder after the runs, thresholds between two bf16 values
    and on one, negative, -0 and -inf, leaving many, few, one or no scores."""
    import torch

    from paper_assets.engine import knn_band
    from paper_assets.engine.knn_band import GROUP_COLUMNS, above

    monkeypatch.setattr(knn_band, "DIRECT_SHARE", direct_share)
    generator = torch.Generator().manual_seed(2)
    for width in (GROUP_COLUMNS * 40, GROUP_COLUMNS * 40 + 77, 50):
        continuous = torch.randn(64, width, generator=generator).bfloat16()
        tied = torch.randint(0, 12, (64, width), generator=generator).bfloat16()
        negative = (continuous.float() - 1.5).bfloat16()
        negative[5] = -0.1 - 0.1 * torch.rand(width, generator=generator)  # every score negative and above -0.5
        for scores in (continuous, negative, tied):
            threshold = torch.quantile(scores.float(), torch.rand(64, generator=generator) * 0.2 + 0.8, dim=1)
            threshold = threshold.diagonal().clone()
            threshold[1::2] = threshold[1::2].bfloat16().float()  # on a bf16 value: ties with scores
            threshold[0] = float(scores[0].float().max()) + 1e-3  # nothing at or above
            threshold[2] = float(scores[2].float().max())  # only the maximum (and its ties)
            threshold[3], threshold[4], threshold[5] = -0.0, -torch.inf, -0.5
            limit = knn_band._round_down(threshold, torch.bfloat16)
            rows, cols, val = above(scores, limit)
            assert (torch.diff(rows) >= 0).all() and val.dtype == torch.float32
            got = {(int(r), int(c), float(v)) for r, c, v in zip(rows, cols, val, strict=True)}
            want = {(int(r), int(c), float(scores[r, c]))
                    for r, c in torch.nonzero(scores.float() >= limit.float()[:, None])}
            assert got == want
            assert {(r, c) for r, c, _ in got} >= {(int(r), int(c)) for r, c in
                                                   torch.nonzero(scores.float() >= threshold[:, None])}


def test_thresholds_round_down_to_the_nearest_bf16_value_at_or_below():
    import torch

    from paper_assets.engine.knn_band import _round_down

    threshold = torch.cat([torch.randn(10_000) * 0.3, torch.tensor([0.0, -0.0, 1.0, 0.5, 1e-30, -1e-30])])
    low = _round_down(threshold, torch.bfloat16)
    assert (low.float() <= threshold).all()
    finite = (low > -torch.inf) & (low != 0)
    up = low.view(torch.int16) + torch.where(low > 0, 1, -1).to(torch.int16)  # the next bf16 value up
    assert (up.view(torch.bfloat16)[finite].float() > threshold[finite]).all()
    assert (_round_down(threshold, torch.float32) == threshold).all()


def test_months_in_date_order_reuse_the_rounded_prior_blocks_and_get_the_same_neighbours(monkeypatch):
    """One PriorBlocks over a run of months keeps full blocks rounded within its byte budget (and every full block's
    norms), and each month's neighbours equal a search that rounds every block afresh."""
    import torch

    from paper_assets.engine import device_knn as knn

    monkeypatch.setattr(knn, "QUERY_ROWS", 150)
    monkeypatch.setattr(knn, "PRIOR_ROWS", 400)
    rng = np.random.default_rng(4)
    centres = rng.normal(size=(12, 32))
    priors = _unit(centres[rng.integers(0, 12, 3000)] + 0.5 * rng.normal(size=(3000, 32)))
    block_bytes = 400 * 32 * 2
    blocks = knn.PriorBlocks(priors, torch.bfloat16, torch.device("cpu"), budget=2 * block_bytes + 10)
    stats = knn.DeviceKnnStats()
    for end in (500, 1300, 2100, 2700):
        queries = priors[end:end + 300]
        kept = knn.device_knn(queries, priors, end, 10, torch.device("cpu"), stats=stats, blocks=blocks)
        fresh = knn.device_knn(queries, priors, end, 10, torch.device("cpu"))
        np.testing.assert_array_equal(kept[0], fresh[0])
        np.testing.assert_array_equal(kept[1], fresh[1])
    assert sorted(blocks._blocks) == [0, 400] and blocks.kept_bytes == 2 * block_bytes
    assert sorted(blocks._norms) == [0, 400, 800, 1200, 1600, 2000]  # 2400.. ends at a month
    again = [blocks.block(start, start + 400) for start in (800, 1200)]  # beyond the budget: one reused buffer
    assert again[0].low.data_ptr() == again[1].low.data_ptr() != blocks.block(400, 800).low.data_ptr()
    _, fresh_block = knn._round(priors[1200:1600], torch.bfloat16, torch.device("cpu"))
    assert torch.equal(again[1].low, fresh_block.low.index_select(0, again[1].order))
    assert stats.queries == 1200 and min(stats.seconds_rounding, stats.seconds_products, stats.seconds_selection,
                                         stats.seconds_rescoring) > 0
    with pytest.raises(ValueError, match="other vectors"):
        knn.device_knn(priors[:5], priors.copy(), 100, 3, torch.device("cpu"), blocks=blocks)


def test_the_index_keeps_its_prior_blocks_across_months_and_equals_faiss(tmp_path, monkeypatch):
    """paper_novelty's months through PaperIndex.search_device with bf16 candidates (as on a CPU with native bf16):
    one PriorBlocks for the whole run, and every month's metrics equal FAISS's exact search."""
    import torch

    from paper_assets.benchkit.novelty_bench import synthetic_corpus
    from paper_assets.engine import device_knn as knn
    from paper_assets.engine import novelty
    from paper_assets.engine.novelty_params import IndexParams, NoveltyParams
    from paper_assets.engine.paper_index import PaperIndex, write_index

    monkeypatch.setattr(knn, "knn_device", lambda: (torch.device("cpu"), True))
    monkeypatch.setattr(knn, "PRIOR_ROWS", 256)
    ids, days, vectors = synthetic_corpus(1500, 6, dim=32, topics=30, seed=3)
    manifest = write_index(tmp_path, ids, days, vectors, "fp", "test", IndexParams(graph="never"))
    index = PaperIndex(tmp_path / manifest.build)
    for month in sorted(manifest.months)[1:]:
        device = novelty.compute_month(index, month, NoveltyParams(search="device"))
        exact = novelty.compute_month(index, month, NoveltyParams(search="exact"))
        assert device.search == "device" and device.recall == 1.0
        assert device.recall_sample == min(NoveltyParams().device_recall_sample, device.papers) < exact.recall_sample
        for metric in novelty.METRICS:
            np.testing.assert_allclose(device.table.column(metric).to_numpy(), exact.table.column(metric).to_numpy(),
                                       atol=1e-5)
    assert index.prior_blocks.dtype == torch.bfloat16 and index.prior_blocks.kept_bytes > 0
    assert index.device_search_stats.queries == sum(manifest.month_bounds(m)[1] - manifest.month_bounds(m)[0]
                                                    for m in sorted(manifest.months)[1:])


def _clustered(count: int, dim: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(12, dim))
    return _unit(centres[rng.integers(0, 12, count)] + 0.5 * rng.normal(size=(count, dim)))


def test_seed_floors_lie_under_each_querys_kth_best_among_the_priors_before_the_end():
    """A floor is the k-th best fp32 cosine among the latest members of the query's centroid, less the fp32
    product's error: never above the k-th best cosine over ``priors[:end]``, for an end below the assigned blocks
    too (members at or after the end are not used, though their block is assigned), and close to it on clustered
    papers."""
    import torch

    from paper_assets.engine.knn_seed import SeedFloors

    priors = _clustered(3000, 32, 6)
    seeds = SeedFloors(priors, centroids=16, members=300)
    for start in range(0, 2400, 400):
        seeds.assign(start, torch.from_numpy(priors[start:start + 400]).bfloat16())
    queries, k = torch.from_numpy(priors[2400:2700]), 20
    for end in (2400, 1200, 300):
        floors = seeds.floors(queries, end, k).double().numpy()
        exact = np.sort(priors[2400:2700].astype(np.float64) @ priors[:end].T.astype(np.float64), axis=1)
        kth = exact[:, -k]
        assert (floors <= kth).all()
        finite = np.isfinite(floors)
        if end >= 1200:  # centroids with at least k members before the end
            assert finite.mean() > 0.9 and np.median(kth[finite] - floors[finite]) < 0.04
    assert np.isinf(seeds.floors(queries, 2400, 400).numpy()).all()  # no centroid has 400 members
    assert np.isinf(SeedFloors(priors).floors(queries, 2400, k).numpy()).all()  # nothing assigned yet


def test_seeded_bands_pass_fewer_scores_and_find_the_same_neighbours(monkeypatch):
    """With floors the blocks' threshold passes keep fewer scores than from each block's k-th best alone, and, a
    floor being a bound on the k-th best cosine itself (within e(q) of it, not 2·e(q)), fewer are rescored; the
    neighbours and cosines are exactly those of the unseeded search."""
    import torch

    from paper_assets.engine import device_knn as knn
    from paper_assets.engine.knn_seed import SeedFloors

    monkeypatch.setattr(knn, "PRIOR_ROWS", 500)
    priors = _clustered(6000, 32, 7)
    queries, end, k = priors[5000:5600], 5000, 30
    found = {}
    for seeded in (True, False):
        blocks = knn.PriorBlocks(priors, torch.bfloat16, torch.device("cpu"))
        blocks.seeds = SeedFloors(priors, centroids=16) if seeded else None
        stats = knn.DeviceKnnStats()
        found[seeded] = knn.device_knn(queries, priors, end, k, torch.device("cpu"), stats=stats, blocks=blocks)
        found[seeded] += (stats,)
    with_floor, without = found[True][2], found[False][2]
    assert with_floor.seeded > 500 and without.seeded == 0
    assert with_floor.passed_threshold < 0.5 * without.passed_threshold
    assert with_floor.rescored < without.rescored
    np.testing.assert_array_equal(found[True][0], found[False][0])
    np.testing.assert_array_equal(found[True][1], found[False][1])


def test_priors_too_alike_for_bf16_go_to_fp32_and_later_calls_skip_bf16_until_a_sample_pays():
    """Half the priors so alike that bf16 cannot order a query's neighbours among them (every score within its
    error bound of the k-th): the first call sends the uncertified to fp32 at once, without the wider bf16 pass;
    the next call searches in fp32 only; the one after tries bf16 on a sample of 64 queries, which fails, so that
    call and the next two search in fp32 only; a call whose queries bf16 can separate passes the sample and is
    certified. Every call returns the exact fp32 neighbours."""
    import torch

    from paper_assets.engine import device_knn as knn

    rng = np.random.default_rng(7)
    base = rng.normal(size=32)
    priors = _unit(np.vstack([base + 0.002 * rng.normal(size=(1500, 32)), rng.normal(size=(1500, 32))]))
    alike, apart = _unit(base + 0.002 * rng.normal(size=(200, 32))), _unit(rng.normal(size=(200, 32)))
    blocks = knn.PriorBlocks(priors, torch.bfloat16, torch.device("cpu"))
    expected = ((alike, "wider 0, fp32 again", (1, 2)), (alike, "fp32 only", (0, 2)),
                (alike, "sample fails", (2, 4)), (alike, "fp32 only", (1, 4)), (alike, "fp32 only", (0, 4)),
                (apart, "sample pays", (0, 1)))
    for queries, what, skips_and_backoff in expected:
        stats = knn.DeviceKnnStats()
        positions, cosines = knn.device_knn(queries, priors, 3000, 20, torch.device("cpu"), stats=stats,
                                            blocks=blocks)
        sims = queries @ priors.T
        truth = np.sort(sims, axis=1)[:, ::-1][:, :20]
        np.testing.assert_allclose(cosines, truth, atol=2e-6)
        np.testing.assert_allclose(np.take_along_axis(sims, positions, 1), cosines, atol=2e-6)
        if what == "wider 0, fp32 again":
            assert stats.searched_again_wider == 0 and stats.searched_again_in_fp32 > 100
        elif what == "fp32 only":
            assert stats.searched_in_fp32_only == 200 and stats.certified == stats.passed_threshold == stats.probed == 0
        elif what == "sample fails":
            assert stats.probed == 64 and stats.searched_in_fp32_only == 200 and stats.certified == 0
        else:
            assert stats.probed == 64 and stats.certified == 200 and stats.searched_in_fp32_only == 0
        assert (blocks.low_precision.skips, blocks.low_precision.backoff) == skips_and_backoff
