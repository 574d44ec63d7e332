"""Training-time attacks: attacks that change how the victim is trained, not only its data.

`ATTACKS[name].build(config, model, trigger, setup, mesh, num_classes, key) -> step` turns the
clean supervised phase `setup` into the attacked train step; `config.attack.name` selects one
("none": plain training on the poison plan's data). Sections: `config.attack.<name>`.
"""

from jaxbd import config as config_lib
from jaxbd.attacks import pcb

ATTACKS = {
    "pcb": config_lib.Component(pcb.default_config, pcb.validate, pcb.build),
}
