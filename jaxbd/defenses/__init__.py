"""Post-training defenses: pure functions over variable pytrees, and their registry.

`DEFENSES[name].build(ctx, variables, trusted, config.defense.<name>, key) -> (variables, report)`
(see `jaxbd.defenses.base` for the contract): `ft` (vanilla fine-tuning), `d3` (Distance-Driven
Detoxification), `pt` (Pivotal Tuning), `fine_pruning` (prune dormant channels, then fine-tune).
Each defense's config section is `config.defense.<name>`; `defense.names` lists the defenses an
experiment runs. Detection (calibrated trigger inversion, Neural Cleanse) scores models instead
of repairing them: see `jaxbd.defenses.detection`.
"""

import types

from jaxbd import config as config_lib
from jaxbd.defenses import base, d3, fine_pruning, fine_tuning, pivotal_tuning
from jaxbd.defenses.base import Context, Trusted, trusted_split

DEFENSES = types.MappingProxyType({
    "ft": config_lib.Component(fine_tuning.default_config, fine_tuning.validate,
                                 fine_tuning.fine_tune),
    "fine_pruning": config_lib.Component(fine_pruning.default_config, fine_pruning.validate,
                                         fine_pruning.fine_prune, fine_pruning.check_model),
    "d3": config_lib.Component(d3.default_config, d3.validate, d3.d3, d3.check_model),
    "pt": config_lib.Component(pivotal_tuning.default_config, pivotal_tuning.validate,
                                 pivotal_tuning.pivotal_tuning),
})
