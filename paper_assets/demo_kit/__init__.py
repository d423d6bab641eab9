"""The offline demo's stand-ins, also used by the tests and benchmarks: a sample source in the notebook's schema
(``sample_source``) and a small model of SPECTER2's architecture, BERT + a ``seq_bn`` adapter in the adapters
format (``tiny_model``). Neither is SPECTER2."""
