"""PLACEHOLDER until the governor lands."""


class GovernorReport:
    pass


class TolariaGovernor:
    pass
