"""The personalization methods, one folder each (peft style: config, layer math, training,
core), and the registries they fill (:mod:`shared.methods.base`).

The first lookup in the registries (:func:`parse_method`, :func:`core_names`,
:func:`core_class`, :func:`collective`, :func:`collective_kinds`) imports every method folder
under this package (``oppu``, ``perpcs``, ``perfit``, ``baselines`` and any other) and its
``core`` module, which register the cores and kinds of collective parameters; a new method is
a new folder (CONTRIBUTING.md). Importing one module of a method (``shared.methods.perpcs.
pieces``) imports nothing else.
"""

from shared.methods.base import (Collective, Core, MethodSpec, PersonalState,
                                 PromptAugmentation, Runtime, augmented_prompts, collective,
                                 collective_kinds, core_class, core_names, parse_method,
                                 register_collective, register_core, split_arrays,
                                 user_examples)

__all__ = ["Collective", "Core", "MethodSpec", "PersonalState", "PromptAugmentation", "Runtime",
           "augmented_prompts", "collective", "collective_kinds", "core_class", "core_names",
           "parse_method", "register_collective", "register_core", "split_arrays",
           "user_examples"]
