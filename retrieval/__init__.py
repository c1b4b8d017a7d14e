"""seesay's retrieval library: datasets, encoders, scoring, query engine and evaluation."""
