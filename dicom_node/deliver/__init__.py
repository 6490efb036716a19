"""Delivery: results sent by C-STORE to each configured destination, retried until acknowledged."""
