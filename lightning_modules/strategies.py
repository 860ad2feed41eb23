"""Settings of Lightning's sharded strategies that a yaml cannot write by itself (``conf/trainer/fsdp.yaml``)."""

from __future__ import annotations

from hydra.utils import get_class
from torch import nn


def module_classes(names: list[str]) -> set[type[nn.Module]]:
    """The classes named by dotted paths, as a set: what ``FSDPStrategy(auto_wrap_policy=...)`` takes to make every
    module of those classes an FSDP unit of its own (Lightning turns the set into torch's ``ModuleWrapPolicy``).
    A name that does not import is a one-line error naming it."""
    from lightning_modules.errors import CtrlkitError

    classes = set()
    for name in names:
        try:
            found = get_class(name)
        except (ImportError, ValueError) as error:
            raise CtrlkitError(f"trainer.strategy.auto_wrap_policy: cannot import the class {name}") from error
        if not issubclass(found, nn.Module):
            raise CtrlkitError(f"trainer.strategy.auto_wrap_policy: {name} is not a torch.nn.Module class")
        classes.add(found)
    return classes
