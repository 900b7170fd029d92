"""PLACEHOLDER until the runtime work lands."""
