"""Training-time attacks that change the training objective rather than the data.

`quantization`: behavior backdoors conditioned on quantization (QB, Qu-ANTI-zation and its
indiscriminate variant), losses for `jaxbd.train.make_train_step`.
"""
