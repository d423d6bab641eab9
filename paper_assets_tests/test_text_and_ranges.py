import pytest

from paper_assets.engine.batching import (
    bucket_rows,
    full_rows,
    pad_on_device,
    padded_width,
    plan_batches,
    warm_up_shapes,
)
from paper_assets.engine.ranges import IdRange, InvalidRangeKey, parse_range, range_for
from paper_assets.engine.text import clean_field, paper_text, text_sha256


def test_text_rule_title_sep_abstract():
    assert paper_text("A title", "An abstract.", "[SEP]").text == "A title [SEP] An abstract."
    assert paper_text("A title", "An abstract.", "[SEP]").rule == "title_abstract"


@pytest.mark.parametrize("abstract", [None, "", "   ", "\t\n"])
def test_title_only_when_abstract_missing(abstract):
    result = paper_text("Only a title", abstract, "[SEP]")
    assert (result.text, result.rule) == ("Only a title", "title_only")


def test_abstract_only_and_nothing():
    assert paper_text(None, "Body", "[SEP]").text == "[SEP] Body"
    assert paper_text(" ", None, "[SEP]").rule == "no_text"
    assert paper_text(None, None, "[SEP]").text is None


def test_cleaning_control_characters_surrogates_and_whitespace():
    # Deleted like the BERT tokenizer deletes them (category C, U+FFFD); tab/newline and Unicode spaces are spaces.
    assert clean_field("a\x00b\x1f c\u0085d  \n e\u200b\ufffd\u2028f\u00a0g") == "ab cd e f g"
    assert clean_field("typing\u00e2\x80\x94relational") == "typing\u00e2relational"
    assert clean_field("lone \ud800 surrogate") == "lone surrogate"
    assert clean_field("\x00\x01 ") is None
    text_sha256(clean_field("x\ud800"))  # encodable after cleaning


def test_range_keys_are_zero_padded_and_strict():
    rng = range_for(1_234_567, 1_000_000)
    assert rng == IdRange(1_000_000, 1_999_999)
    assert rng.key == "001000000-001999999"
    assert parse_range(rng.key) == rng
    assert parse_range("0-99") == IdRange(0, 99)
    for bad in ("../etc-passwd", "1-0", "abc", "000000001-000000000", "1/2-3"):
        with pytest.raises(InvalidRangeKey):
            parse_range(bad)


def test_plan_batches_covers_every_row_once_within_budget_longest_first():
    import numpy as np

    lengths = np.random.default_rng(0).integers(1, 513, size=1000)
    batches = plan_batches(lengths, token_budget=4096, max_rows=64)
    rows = np.concatenate(batches)
    assert sorted(rows.tolist()) == list(range(1000))
    for batch in batches:
        assert lengths[batch].max() * len(batch) <= 4096 or len(batch) == 1
        assert len(batch) <= 64
    assert lengths[batches[0]].max() == lengths.max()
    padded = sum(lengths[b].max() * len(b) for b in batches)
    unsorted = sum(lengths[i : i + 64].max() * len(lengths[i : i + 64]) for i in range(0, 1000, 64))
    assert padded < 0.7 * unsorted


def test_pad_on_device_gathers_right_padded_rows():
    import torch

    flat, starts, lengths = torch.tensor([1, 2, 3, 4]), torch.tensor([3, 0]), torch.tensor([1, 3])
    ids, mask = pad_on_device(flat, starts, lengths, 4, pad_id=0, positions=torch.arange(8))
    assert ids.tolist() == [[4, 0, 0, 0], [1, 2, 3, 0]]
    assert mask.tolist() == [[1, 0, 0, 0], [1, 1, 1, 0]]


def test_widths_are_rounded_to_the_pad_multiple_within_the_budget():
    import numpy as np

    assert [padded_width(n, 64, 512) for n in (1, 64, 65, 500, 512)] == [64, 64, 128, 512, 512]
    assert padded_width(510, 64, 500) == 510  # never below the longest row, never past max_length otherwise
    lengths = np.random.default_rng(1).integers(1, 513, size=2000)
    batches = plan_batches(lengths, token_budget=16384, max_rows=512, pad_multiple=64)
    widths = {padded_width(int(lengths[b].max()), 64, 512) for b in batches}
    assert widths <= {64, 128, 192, 256, 320, 384, 448, 512}
    assert all(len(b) * padded_width(int(lengths[b].max()), 64, 512) <= 16384 for b in batches)
    assert sorted(np.concatenate(batches).tolist()) == list(range(2000))


def test_a_run_of_many_chunks_uses_a_bounded_set_of_batch_shapes():
    import numpy as np

    assert [bucket_rows(n, 100) for n in (1, 2, 3, 5, 64, 65, 99, 100)] == [1, 2, 4, 8, 64, 100, 100, 100]
    rng = np.random.default_rng(2)
    warm_up = warm_up_shapes(65536, 4096, 64, 512)
    warmed = set(warm_up)
    assert len(warm_up) == len(warmed) == 8 + 10 + 9  # full batches of 8 widths; 1..512 rows at width 64, 1..256 at 128
    shapes, unbucketed = set(), set()
    for _ in range(300):  # 300 chunks of real-looking lengths: every chunk's last batch has its own row count
        lengths = rng.integers(20, 513, size=int(rng.integers(50, 4096)))
        batches = plan_batches(lengths, token_budget=65536, max_rows=4096, pad_multiple=64)
        widths = [padded_width(int(lengths[b].max()), 64, 512) for b in batches]
        for index, (batch, width) in enumerate(zip(batches, widths, strict=True)):
            full = full_rows(width, 65536, 4096)
            assert len(batch) == full or index == len(batches) - 1  # only a chunk's last batch is partial
            run = bucket_rows(len(batch), full)
            assert len(batch) <= run <= full and (run == full or run & (run - 1) == 0)
            shapes.add((run, width))
            unbucketed.add((len(batch), width))
            if width <= 128:  # the two narrowest widths: every row count a run can meet there is warmed at load
                assert (run, width) in warmed
    # 8 widths x (one full shape + at most log2(1024) + 1 powers of two), against one new shape per chunk before
    assert len(shapes) <= 8 * 12 and len(unbucketed) > 2 * len(shapes)


def np_rows(values):
    import numpy as np

    return np.array(values)


def test_concurrent_processes_claim_different_gpus(tmp_path):
    import subprocess
    import sys

    from paper_assets.engine.device import claim_slot

    assert claim_slot(tmp_path, 2) == 0
    assert claim_slot(tmp_path, 2) == 0  # the same process keeps its claim
    code = f"from paper_assets.engine.device import claim_slot; print(claim_slot({str(tmp_path)!r}, 2))"
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert other == "1"
    code_full = f"from paper_assets.engine.device import claim_slot; print(claim_slot({str(tmp_path)!r}, 1))"
    full = subprocess.run([sys.executable, "-c", code_full], capture_output=True, text=True, check=True)
    assert full.stdout.strip() == "None"


def test_column_cleaning_equals_the_plain_three_pass_definition_on_random_unicode():
    """The cleaning's two tuned passes give exactly what the rule says, written plainly: tab/newline/return to
    space, delete category C and U+FFFD, every run of white space to one space, strip."""
    import random

    import pyarrow as pa
    import pyarrow.compute as pc

    from paper_assets.engine.text import clean_column

    def plain(values: pa.Array) -> pa.Array:
        text = pc.replace_substring_regex(values, r"[\t\n\r]", " ")
        text = pc.replace_substring_regex(text, r"[\pC\x{FFFD}]", "")
        text = pc.utf8_trim_whitespace(pc.replace_substring_regex(text, r"[\s\pZ]+", " "))
        return pc.if_else(pc.equal(pc.utf8_length(text), 0), pa.scalar(None, text.type), text)

    tricky = list(" \t\n\r\f\v\x00\x1f\x7f\x85\xa0\u1680\u2000\u200a\u200b\u2028\u2029\u202f\u3000\ufeff\ufffd"
                  "\U000e0001\ue000ab. ")
    rng = random.Random(7)
    texts = []
    for _ in range(3000):
        chars = [rng.choice(tricky) if rng.random() < 0.6 else chr(rng.choice([rng.randrange(0x20, 0x7f),
                 rng.randrange(0xa0, 0xd800), rng.randrange(0xe000, 0x110000)])) for _ in range(rng.randrange(12))]
        texts.append("".join(chars))
    values = pa.array(texts + [None, "", "plain words only"], pa.string())
    assert clean_column(values).to_pylist() == plain(values).to_pylist()
