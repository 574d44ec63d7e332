"""Training-time attacks: attacks that change how the victim is trained, not only its data.

`ATTACKS[name].build(config, model, trigger, setup, mesh, num_classes, key) -> (step, context)`
turns the clean supervised phase `setup` into the attacked train step and the pytree that
`jaxbd.train.fit` passes to its every call (None: nothing); `config.attack.name` selects one
("none": plain training on the poison plan's data). Sections: `config.attack.<name>`.

`batch`: a share of every batch poisoned inside the training loop, as BackdoorBench trains WaNet.
`pcb`: the parameter-controlled backdoor of Pick your Poison.
`latent`: the Latent Backdoor (a trigger fitted to the target's latent representation on the
clean model, injected with a latent loss; the standard experiment fits it).

`quantization`: behavior backdoors conditioned on quantization (QB, Qu-ANTI-zation and its
indiscriminate variant), losses for `jaxbd.train.make_train_step`, used by the `quant_backdoor`
experiment.
"""

import types

from jaxbd import config as config_lib
from jaxbd.attacks import batch, latent, pcb

ATTACKS = types.MappingProxyType({
    "batch": config_lib.Component(batch.default_config, batch.validate, batch.build),
    "pcb": config_lib.Component(pcb.default_config, pcb.validate, pcb.build, pcb.check_model),
    "latent": config_lib.Component(latent.default_config, latent.validate, latent.build),
})
