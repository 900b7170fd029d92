"""PLACEHOLDER until the kasmina work lands."""
