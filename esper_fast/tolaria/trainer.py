"""PLACEHOLDER until the trainer lands."""


class AttributionResult:
    pass


def train_epoch_normal(*a, **k):
    raise NotImplementedError


train_epoch_incubator_mode = train_epoch_blended = validate_and_get_metrics = validate_with_attribution = train_epoch_normal
