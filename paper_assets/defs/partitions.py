from dagster import DynamicPartitionsDefinition

# Keys are inclusive zero-padded corpusid ranges ("000000000-000999999"). They are added by the s2_source asset
# and the release sensor when a source brings ids in a new range, so they never have to be listed by hand.
CORPUSID_RANGES = "corpusid_ranges"
corpusid_ranges = DynamicPartitionsDefinition(name=CORPUSID_RANGES)
