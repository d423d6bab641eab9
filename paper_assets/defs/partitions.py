from dagster import DynamicPartitionsDefinition

# Keys are inclusive zero-padded corpusid ranges ("000000000-000999999"). They are added by the s2_source asset
# and the release sensor when a source brings ids in a new range, so they never have to be listed by hand.
CORPUSID_RANGES = "corpusid_ranges"
corpusid_ranges = DynamicPartitionsDefinition(name=CORPUSID_RANGES)

# Keys are calendar months ("2023-01") from the earliest dated paper to the latest; paper_index adds them.
PUBLICATION_MONTHS = "publication_months"
publication_months = DynamicPartitionsDefinition(name=PUBLICATION_MONTHS)
