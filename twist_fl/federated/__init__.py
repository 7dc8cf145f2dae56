"""Flower: record codecs, reply validation, `TwistStrategy`, the ServerApp and ClientApp logic,
an in-process Grid and fault injection for tests."""
