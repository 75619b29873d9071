"""`engine.wrappers.unwrap`: the one way every layer reaches the model inside its wrappers."""

from torch import nn

from engine.wrappers import unwrap


class Wrapper(nn.Module):
    """Keeps the wrapped model as ``.module``, as DDP and mixed-precision wrappers do."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = module


def test_unwrap_reaches_the_model_through_any_number_of_wrappers():
    model = nn.Linear(2, 2)
    assert unwrap(model) is model
    assert unwrap(Wrapper(model)) is model
    assert unwrap(Wrapper(Wrapper(Wrapper(model)))) is model


def test_a_module_attribute_that_is_not_a_module_is_not_a_wrapper():
    model = nn.Linear(2, 2)
    model.module = "a name, not a wrapped model"  # type: ignore[assignment]
    assert unwrap(model) is model
