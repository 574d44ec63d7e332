"""Training-time attacks: attacks that change how the victim is trained, not only its data.

`ATTACKS[name].build(config, model, trigger, setup, mesh, num_classes, key) -> step` turns the
clean supervised phase `setup` into the attacked train step; `config.attack.name` selects one
("none": plain training on the poison plan's data). Sections: `config.attack.<name>`.

`quantization`: behavior backdoors conditioned on quantization (QB, Qu-ANTI-zation and its
indiscriminate variant), losses for `jaxbd.train.make_train_step`, used by the `quant_backdoor`
experiment.
"""

from jaxbd import config as config_lib
from jaxbd.attacks import pcb

ATTACKS = {
    "pcb": config_lib.Component(pcb.default_config, pcb.validate, pcb.build),
}
