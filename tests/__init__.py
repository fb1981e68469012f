"""Unit, contract and integration tests of the server."""
