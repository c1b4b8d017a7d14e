"""Distributed embedding and index building on Ray Data (`seesay index --engine ray`)."""
