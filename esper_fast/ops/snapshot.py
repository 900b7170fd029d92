"""PLACEHOLDER until the snapshot kernels land."""


class HostSnapshot:
    def __init__(self, *args, **kwargs):
        raise NotImplementedError("snapshot kernels not landed yet")
